"""The tiny config the pipeline and command-line tests run: full LY99 physics on a coarse panel.

Every schema default stays (100 channels, 25 domains, background, noise) except the panel: 256 x 256
pixels of 0.6 mm span the diffraction pattern coarsely, and 4 shots in 2 shards run in seconds.
"""

from pathlib import Path

import yaml

SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
N_PIXELS, PIXEL_SIZE_MM = 256, 0.6
N_SHOTS, SHOTS_PER_SHARD = 4, 2
PSF_RADIUS_PX = 3


def tiny_config(workdir=None, **simulate_overrides):
    """The config as a dict; `simulate_overrides` replace top-level keys of `simulate`.

    With `workdir`, outputs, logs and reference copies go inside it.
    """
    simulate = {
        "n_shots": N_SHOTS,
        "shots_per_shard": SHOTS_PER_SHARD,
        "detector": {
            "n_fast": N_PIXELS,
            "n_slow": N_PIXELS,
            "pixel_size_mm": PIXEL_SIZE_MM,
            # About one pixel, as the default 0.08 mm is on the 0.088 mm production pixels.
            "psf_fwhm_mm": 0.6,
            "psf_radius_px": PSF_RADIUS_PX,
        },
    }
    simulate.update(simulate_overrides)
    config = {"reference": {"mirror_dir": str(SHARED_DATA_DIR)}, "simulate": simulate}
    if workdir is not None:
        config["output_dir"] = str(workdir / "results")
        config["log_dir"] = str(workdir / "logs")
        config["reference"]["dir"] = str(workdir / "resources" / "reference")
    return config


def write_config(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


#: A panel DIALS can index, still quick to simulate: 1536 x 1536 pixels of 0.176 mm (twice the Rayonix
#: pixel) reach 2.3 A at the edge. Each pixel sees four times the production solid angle, so the water
#: and air paths are cut by four to keep the production background per pixel (about 250 photons);
#: with the full background, the 1 % calibration noise alone makes DIALS's dispersion spot finder call
#: thousands of background pixels strong.
INDEXABLE_N_PIXELS, INDEXABLE_PIXEL_SIZE_MM = 1536, 0.176


def indexable_config(workdir=None, **simulate_overrides):
    """Like :func:`tiny_config`, on a panel that dials.stills_process indexes (see above)."""
    config = tiny_config(workdir)
    # The schema's point spread function (0.08 mm FWHM) stays.
    config["simulate"]["detector"] = {
        "n_fast": INDEXABLE_N_PIXELS, "n_slow": INDEXABLE_N_PIXELS, "pixel_size_mm": INDEXABLE_PIXEL_SIZE_MM}
    config["simulate"]["background"] = {"water_thickness_mm": 0.025, "air_path_mm": 2.5}
    config["simulate"].update(simulate_overrides)
    return config
