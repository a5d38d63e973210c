"""Running the study at scale: the stage launcher (torchrun, warm start), the grid of DVC
experiments, its submission and collection, the DVC remote, experiments side by side."""
