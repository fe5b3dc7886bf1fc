"""apps/audio: raw-waveform generation with a Mamba U-Net (SaShiMi layout) on 8-bit µ-law audio at 16 kHz.

data (soundfile I/O, torchaudio resampling and µ-law, SC09 / folder / long-audio datasets), recipes (espeak-ng
spoken digits), model (AudioUNet: parallel forward == recurrent step; AudioLM), fast (the whole-network step in
C++), train / evaluate / generate / demo / metrics / compare. See docs/audio.md.
"""
