"""Detector and beam geometry in the DIALS laboratory frame.

The beam travels along -z. The single panel faces the beam: fast axis (1, 0, 0), slow axis
(0, -1, 0), plane z = -distance. Pixel (x, y) covers [x, x+1) x [y, y+1) in pixel units; its
centre, where the simulator samples the diffraction, is at (x + 0.5, y + 0.5). The beam centre is
the point where the direct beam meets the panel, in millimetres along fast and slow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FAST_AXIS = (1.0, 0.0, 0.0)
SLOW_AXIS = (0.0, -1.0, 0.0)
BEAM_DIRECTION = (0.0, 0.0, -1.0)


@dataclass(frozen=True)
class Detector:
    """A flat single-panel detector facing the beam, with its sensor properties."""

    n_fast: int
    n_slow: int
    pixel_size_mm: float
    distance_mm: float
    beam_center_mm: tuple[float, float]
    thickness_mm: float = 0.0
    attenuation_length_mm: float = 1.0

    @property
    def origin_mm(self) -> np.ndarray:
        """Laboratory position of the panel corner (pixel coordinate 0, 0)."""
        beam_x, beam_y = self.beam_center_mm
        return np.array([-beam_x, beam_y, -self.distance_mm])

    def with_beam_center_offset_px(self, offset_px: tuple[float, float]) -> "Detector":
        """The same detector with its beam centre moved by ``offset_px`` (fast, slow) pixels."""
        return Detector(self.n_fast, self.n_slow, self.pixel_size_mm, self.distance_mm,
                        (self.beam_center_mm[0] + offset_px[0] * self.pixel_size_mm,
                         self.beam_center_mm[1] + offset_px[1] * self.pixel_size_mm),
                        self.thickness_mm, self.attenuation_length_mm)

    def pixel_centres_mm(self, fast_index: torch.Tensor, slow_index: torch.Tensor) -> torch.Tensor:
        """Laboratory positions (..., 3) of pixel centres for integer pixel indices."""
        dtype = torch.float64
        fast_mm = (fast_index.to(dtype) + 0.5) * self.pixel_size_mm
        slow_mm = (slow_index.to(dtype) + 0.5) * self.pixel_size_mm
        origin = torch.as_tensor(self.origin_mm, dtype=dtype, device=fast_index.device)
        return torch.stack((origin[0] + fast_mm, origin[1] - slow_mm,
                            origin[2].expand_as(fast_mm)), dim=-1)

    def project_directions_px(self, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where rays from the sample along ``directions`` (..., 3) meet the panel plane.

        Returns fast and slow pixel coordinates and a mask of rays that travel towards the panel.
        """
        towards_panel = directions[..., 2] < 0
        depth = torch.where(towards_panel, -directions[..., 2], torch.ones_like(directions[..., 2]))
        scale = self.distance_mm / depth
        origin = self.origin_mm
        fast_px = (directions[..., 0] * scale - origin[0]) / self.pixel_size_mm
        slow_px = (origin[1] - directions[..., 1] * scale) / self.pixel_size_mm
        return fast_px, slow_px, towards_panel


def polarization_factor(unit_directions: torch.Tensor, polarization_fraction: float,
                        polarization_normal=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """Polarization factor for a beam along -z, as dxtbx defines the beam's polarization.

    A fraction ``f`` of the intensity is polarized along the electric vector e = n x beam
    (n the polarization-plane normal), the rest along n. Scattering into direction d keeps
    ``1 - (d.e)^2`` of the first part and ``1 - (d.n)^2`` of the second.
    """
    normal = torch.as_tensor(polarization_normal, dtype=unit_directions.dtype, device=unit_directions.device)
    beam = torch.as_tensor(BEAM_DIRECTION, dtype=unit_directions.dtype, device=unit_directions.device)
    electric = torch.linalg.cross(normal, beam)
    along_e = unit_directions @ electric
    along_n = unit_directions @ normal
    return polarization_fraction * (1 - along_e ** 2) + (1 - polarization_fraction) * (1 - along_n ** 2)


def solid_angle_sr(positions_mm: torch.Tensor, detector: Detector) -> torch.Tensor:
    """Solid angle of a pixel seen from the sample: area * cos(obliquity) / r^2."""
    radius = torch.linalg.norm(positions_mm, dim=-1)
    return detector.pixel_size_mm ** 2 * (detector.distance_mm / radius) / radius ** 2


def capture_fraction(unit_directions: torch.Tensor, detector: Detector) -> torch.Tensor:
    """Fraction of photons absorbed in the sensor: 1 - exp(-thickness / (attenuation length * cos)).

    ``cos`` is the cosine between the ray and the panel normal: oblique rays see a thicker sensor.
    A sensor of zero thickness is treated as a perfect absorber (fraction 1), as nanoBragg does.
    """
    if detector.thickness_mm <= 0:
        return torch.ones(unit_directions.shape[:-1], dtype=unit_directions.dtype, device=unit_directions.device)
    cos_obliquity = -unit_directions[..., 2]
    return 1 - torch.exp(-detector.thickness_mm / (detector.attenuation_length_mm * cos_obliquity))
