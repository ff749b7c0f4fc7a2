# Hydra configs, shipped inside the package as `dsp.conf` (see pyproject.toml).
