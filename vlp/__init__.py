"""vlp: vision-language-audio pretraining on WebDataset streams under DeepSpeed ZeRO."""

__version__ = "0.1.0"
