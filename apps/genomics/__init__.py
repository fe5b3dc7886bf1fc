"""hiss genomics: DNA language models on ssm_core. data.py (tokenizer, FASTA/BED/GenBank readers, the
LightningDataModule), model.py (DNALM), train.py / evaluate.py (command lines), configs/ (YAML)."""
