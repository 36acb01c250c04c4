"""Entry points of images from elsewhere (``input.source: images``).

``python -m xfel_spread.cli.images list``: the run's image list (``shot file frame``), from the files and globs.
``python -m xfel_spread.cli.images shard``: one image-list shard (files, frames, spectra, mask; no pixels).
``python -m xfel_spread.cli.images nxmx``: one of the project's shards exported as NeXus/NXmx with its spectra.

The rules run them as modules (``{ENV_BIN}/python -m``); ``pyproject.toml`` also installs them as
``spread-list-images``, ``spread-image-shard`` and ``spread-export-nxmx``.
"""

from __future__ import annotations

import argparse
import sys

from xfel_spread.cli.common import run_command
from xfel_spread.config import load_config


def list_images_main(argv: list[str] | None = None) -> int:
    """``spread-list-images``: list every (file, frame) of the given files and globs; exit status."""
    parser = argparse.ArgumentParser(prog="spread-list-images",
                                     description="List every image (file, frame) of files and globs, reading no pixels.")
    parser.add_argument("--image", action="append", required=True, help="a file or glob (repeatable, in order)")
    parser.add_argument("--list", required=True, help="the image list to write (TSV: shot, file, frame)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.io.images import list_images, write_list_table

        shots = list_images(arguments.image)
        write_list_table(arguments.list, shots)
        print(f"{len(shots)} images in {len({shot.path for shot in shots})} files", file=sys.stderr)

    return run_command("spread-list-images", action)


def image_shard_main(argv: list[str] | None = None) -> int:
    """``spread-image-shard``: write one image-list shard from shots START..STOP-1 of the images; exit status."""
    parser = argparse.ArgumentParser(prog="spread-image-shard",
                                     description="Write one image-list shard: files, frames, spectra, mask.")
    parser.add_argument("--config", required=True, help="settings of the images stage (YAML, section input)")
    parser.add_argument("--image", action="append", required=True, help="a file or glob (repeatable, in order)")
    parser.add_argument("--shots", required=True, type=int, nargs=2, metavar=("START", "STOP"),
                        help="this shard's shots START..STOP-1 of the images' list")
    parser.add_argument("--digest", default=None,
                        help="the shard's shots as planned (xfel_spread.io.images.shots_digest): stop if they differ")
    parser.add_argument("--output", required=True, help="the image-list shard to write (HDF5)")
    parser.add_argument("--channel-grid", type=float, nargs=3, metavar=("START_EV", "STEP_EV", "N"), default=None,
                        help="the structure-factor channels (structure_factors.channel_start_ev, channel_step_ev, "
                             "n_channels): refuse spectra outside them. The workflow passes it when a stage that "
                             "evaluates spectra on them will run (xfel_spread.workflow.channel_grid_option)")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.io.images import ImageInputError, list_images, make_image_list_shard, shots_digest
        from xfel_spread.sim.structure_factors import channel_energies

        settings = load_config(arguments.config)["input"]
        shots = list_images(arguments.image)
        start, stop = arguments.shots
        if not 0 <= start < stop <= len(shots):
            raise ImageInputError(f"{arguments.image[0]}: lists {len(shots)} images, the shard needs {start}..{stop - 1}")
        if arguments.digest is not None and shots_digest(shots[start:stop]) != arguments.digest:
            raise ImageInputError(f"{arguments.image[0]}: images {start}..{stop - 1} are not those the run planned "
                                  "(files added or removed since); plan the run again")
        grid = None
        if arguments.channel_grid is not None:
            start_ev, step_ev, n_channels = arguments.channel_grid
            grid = channel_energies(start_ev, step_ev, int(n_channels))
        listing = make_image_list_shard(arguments.output, shots[start:stop], start, settings["spectra"],
                                        settings["spectra_table"], settings["energy_offset_ev"], settings["mask"],
                                        settings["max_unreadable_fraction"], grid)
        for shot, reason in zip(listing.shots, listing.unreadable):
            if reason:
                print(f"warning: skipped {shot.path} frame {shot.frame}: {reason}", file=sys.stderr)
        print(f"{arguments.output}: {listing.n_shots} images, {sum(not reason for reason in listing.unreadable)} "
              f"readable, spectra: {settings['spectra']}", file=sys.stderr)

    return run_command("spread-image-shard", action)


def export_nxmx_main(argv: list[str] | None = None) -> int:
    """``spread-export-nxmx``: write a simulated shard as a NeXus/NXmx file with its spectra; exit status."""
    parser = argparse.ArgumentParser(prog="spread-export-nxmx",
                                     description="Write one of the project's shards as NeXus/NXmx, spectra included.")
    parser.add_argument("--shard", required=True, help="a shard (HDF5, e.g. results/sim/nopsf/shard_00000.h5)")
    parser.add_argument("--output", required=True, help="the NXmx file to write")
    arguments = parser.parse_args(argv)

    def action():
        from xfel_spread.io.nexus import write_nxmx

        write_nxmx(arguments.shard, arguments.output)
        print(f"{arguments.output}: written from {arguments.shard}", file=sys.stderr)

    return run_command("spread-export-nxmx", action)


def main(argv: list[str] | None = None) -> int:
    """``python -m xfel_spread.cli.images {list,shard,nxmx} ...``."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"list": list_images_main, "shard": image_shard_main, "nxmx": export_nxmx_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m xfel_spread.cli.images {list,shard,nxmx} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
