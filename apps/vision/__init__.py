"""Vision Mamba (Vim) on ssm_core: timm-registered models (``import apps.vision`` registers ``vim_*``), hustvl
checkpoint loading, ImageFolder / ImageNet-subset / Fashion-MNIST data, training, evaluation and a demo."""

from apps.vision.model import VisionMamba, checkpoint_filter_fn, load_hustvl, load_vision_model, save_vision_model

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_hustvl", "load_vision_model", "save_vision_model"]
