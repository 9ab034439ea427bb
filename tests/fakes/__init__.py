"""Fakes at the operating-system and GPU boundary only: NVML, nvidia-smi, sysfs."""
