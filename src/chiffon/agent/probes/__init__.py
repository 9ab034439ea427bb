"""What the agent reads from this machine: host (psutil) and one backend per GPU vendor."""
