"""LoRA fine-tuning with exact resumption, the study's recipe, the deep ensemble's members,
the export of a checkpoint's adapter."""
