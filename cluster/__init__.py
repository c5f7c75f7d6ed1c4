"""Running the Serve app on HPC clusters: Slurm launch, accelerator detection, node autoscaling."""
