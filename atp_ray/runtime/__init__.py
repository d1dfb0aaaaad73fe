"""What every run stands on, whatever the recipe: ``modeling`` (loading base models and
tokenizers), ``run_folder`` (a run folder's layout and atomic writes), ``process`` (device,
peers, checkpoints) and ``strategies`` (DDP, FSDP, DeepSpeed ZeRO).
"""
