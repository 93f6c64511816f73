"""nnU-Net trainers for the Swin encoder + SwinUNETR decoder (found through nnUNet_extTrainer)."""
