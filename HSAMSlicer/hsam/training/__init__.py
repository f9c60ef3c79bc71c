"""Training, few-shot fine-tuning and their data: datasets, splits, augmentation, losses, schedules, the loop.

Importing this package is light; the submodules import torch.
"""
