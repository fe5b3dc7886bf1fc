"""hiss genomics: DNA language models and classifiers on ssm_core.

data.py (HyenaDNA tokenizer, pyfaidx FASTA, BED splits, GenBank, DNADataModule), tasks.py (labelled TSV sets for
fine-tuning), model.py (DNALM, DNAModel: BiMamba / RC-equivariant / Transformer backbones with heads, DNAClassifier,
MaskedLMModule), train.py (causal LM), finetune.py (classification, masked-LM pretraining), evaluate.py (exact
bits/base), predict.py (likelihoods, variant scores, embeddings, generation), demo.py (Gradio), configs/ (YAML).
"""
