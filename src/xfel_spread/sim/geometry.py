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


# ---------------------------------------------------------------------------------------------
# Multi-panel detectors


@dataclass(frozen=True)
class Panel:
    """One flat panel of a tiled detector, as dxtbx describes it (laboratory frame, millimetres).

    Pixel ``(x, y)`` of the panel (fast, slow, zero-based) covers ``origin + [x, x+1) * p * fast +
    [y, y+1) * p * slow`` (p the square pixel's side); its centre is at ``x + 0.5``, ``y + 0.5``.
    The panel's normal is ``fast x slow`` (dxtbx's ``get_normal``); it faces the sample when the
    origin's component along it is positive (the single LY99 panel: normal (0, 0, -1)).
    """

    origin_mm: tuple[float, float, float]
    fast_axis: tuple[float, float, float]
    slow_axis: tuple[float, float, float]
    pixel_size_mm: float
    n_fast: int
    n_slow: int
    thickness_mm: float = 0.0
    attenuation_length_mm: float = 1.0
    name: str = ""

    def __post_init__(self):
        fast, slow = np.asarray(self.fast_axis, float), np.asarray(self.slow_axis, float)
        if abs(np.linalg.norm(fast) - 1) > 1e-6 or abs(np.linalg.norm(slow) - 1) > 1e-6 or abs(fast @ slow) > 1e-6:
            raise ValueError(f"panel {self.name!r}: fast and slow axes must be orthogonal unit vectors")
        if not (self.pixel_size_mm > 0 and self.n_fast > 0 and self.n_slow > 0):
            raise ValueError(f"panel {self.name!r}: pixel size and shape must be positive")

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.fast_axis, self.slow_axis)

    @property
    def distance_mm(self) -> float:
        """Distance of the panel's plane from the sample (origin . normal)."""
        return float(np.asarray(self.origin_mm) @ self.normal)


class MultiPanelDetector:
    """A tiled detector: flat panels each with its own origin, axes, pixel size, shape and sensor.

    A pixel is named by ``(panel, fast, slow)``; its position is
    ``origin[panel] + (fast + 0.5) p fast_axis[panel] + (slow + 0.5) p slow_axis[panel]`` and its solid
    angle ``p^2 |pos . normal| / |pos|^3``, with the sensor's capture taken along the panel's normal.
    ``shift_mm`` (a float or a torch scalar, differentiable) moves every panel along the beam, away
    from the sample when positive (stage 1's ``detz_shift``). The single LY99 panel is
    :meth:`from_single`; :meth:`split` cuts a panel into abutting tiles (with optional gaps and
    shifts); :func:`cspad_like_layout` builds a 64-tile detector; :meth:`from_dxtbx` reads one from a
    dxtbx detector (an ``.expt`` or an image).
    """

    def __init__(self, panels, shift_mm=0.0):
        self.panels = tuple(panels)
        if not self.panels:
            raise ValueError("a detector needs at least one panel")
        self.shift_mm = shift_mm
        #: A rigid move of every panel in the laboratory frame, (3,) mm (a torch vector carries its
        #: gradient), or None (:meth:`translated`; the pixel metrology's level-0 move of a tiled detector).
        self.translation_mm = None
        self._origin = np.array([p.origin_mm for p in self.panels], dtype=np.float64)
        self._fast = np.array([p.fast_axis for p in self.panels], dtype=np.float64)
        self._slow = np.array([p.slow_axis for p in self.panels], dtype=np.float64)
        self._normal = np.cross(self._fast, self._slow)
        self._pixel = np.array([p.pixel_size_mm for p in self.panels], dtype=np.float64)
        self._thickness = np.array([p.thickness_mm for p in self.panels], dtype=np.float64)
        self._attenuation = np.array([p.attenuation_length_mm for p in self.panels], dtype=np.float64)
        self.n_fast_per_panel = np.array([p.n_fast for p in self.panels], dtype=np.int64)
        self.n_slow_per_panel = np.array([p.n_slow for p in self.panels], dtype=np.int64)
        sizes = self.n_fast_per_panel * self.n_slow_per_panel
        #: Offset of each panel's first pixel in the detector's flat pixel numbering (panel-major).
        self.pixel_offsets = np.concatenate(([0], np.cumsum(sizes)))
        self._tables: dict = {}

    def __len__(self) -> int:
        return len(self.panels)

    def __getitem__(self, index: int) -> Panel:
        return self.panels[index]

    def __repr__(self) -> str:
        return f"MultiPanelDetector({len(self.panels)} panels, shift_mm={self.shift_mm!r})"

    @property
    def n_pixels(self) -> int:
        return int(self.pixel_offsets[-1])

    @property
    def distance_mm(self):
        """Mean distance of the panels' planes from the sample, including the shift."""
        origin = self._origin
        if self.translation_mm is not None:
            origin = origin + np.asarray(torch.as_tensor(self.translation_mm).detach().cpu(), dtype=np.float64)
        return float(np.mean(np.abs(np.einsum("pi,pi->p", origin, self._normal)))) + self.shift_mm

    @property
    def pixel_size_mm(self) -> float:
        """The pixel size when every panel has the same one (stage 1's point spread needs it)."""
        if np.ptp(self._pixel) > 1e-12:
            raise ValueError("the panels' pixel sizes differ")
        return float(self._pixel[0])

    def uniform_panels(self) -> tuple[int, int, float]:
        """(n_slow, n_fast, pixel size mm) shared by every panel, for the stages that hold the panels as
        one ``(n_panels, n_slow, n_fast)`` array; ValueError (one line) when the panels differ."""
        shapes = {(panel.n_slow, panel.n_fast) for panel in self.panels}
        if len(shapes) != 1:
            raise ValueError(f"the detector's {len(self)} panels have {len(shapes)} shapes; one shape is needed for "
                             "all (the panels are held as one array)")
        n_slow, n_fast = shapes.pop()
        return n_slow, n_fast, self.pixel_size_mm

    def shifted(self, shift_mm) -> "MultiPanelDetector":
        """The detector moved along the beam by ``shift_mm`` more (a float or a torch scalar)."""
        moved = MultiPanelDetector.__new__(MultiPanelDetector)
        moved.__dict__.update(self.__dict__)
        moved.shift_mm = self.shift_mm + shift_mm
        return moved

    def translated(self, vector_mm) -> "MultiPanelDetector":
        """The detector with every panel moved rigidly by ``vector_mm`` (3,) more in the laboratory frame (a
        float sequence or a torch vector, differentiable)."""
        moved = MultiPanelDetector.__new__(MultiPanelDetector)
        moved.__dict__.update(self.__dict__)
        moved.translation_mm = vector_mm if self.translation_mm is None else self.translation_mm + vector_mm
        return moved

    def tables(self, device, dtype=torch.float64) -> dict:
        """Per-panel tensors: origin (P, 3, shift included), fast, slow, normal (P, 3), pixel,
        thickness, attenuation (P,), n_fast, n_slow, offset (P,) int64."""
        key = (str(device), dtype)
        fixed = self._tables.get(key)
        if fixed is None:
            def as_tensor(values):
                return torch.as_tensor(values, dtype=dtype, device=device)
            fixed = {"origin": as_tensor(self._origin), "fast": as_tensor(self._fast), "slow": as_tensor(self._slow),
                     "normal": as_tensor(self._normal), "pixel": as_tensor(self._pixel),
                     "thickness": as_tensor(self._thickness), "attenuation": as_tensor(self._attenuation),
                     "n_fast": torch.as_tensor(self.n_fast_per_panel, device=device),
                     "n_slow": torch.as_tensor(self.n_slow_per_panel, device=device),
                     "offset": torch.as_tensor(self.pixel_offsets[:-1], device=device)}
            self._tables[key] = fixed
        tables = dict(fixed)
        if not (isinstance(self.shift_mm, (int, float)) and self.shift_mm == 0):
            beam = torch.as_tensor(BEAM_DIRECTION, dtype=dtype, device=device)
            tables["origin"] = fixed["origin"] + torch.as_tensor(self.shift_mm, dtype=dtype, device=device) * beam
        if self.translation_mm is not None:
            tables["origin"] = tables["origin"] + torch.as_tensor(self.translation_mm, dtype=dtype, device=device)
        return tables

    def pixel_centres_mm(self, fast_index: torch.Tensor, slow_index: torch.Tensor,
                         panel_index: torch.Tensor) -> torch.Tensor:
        """Laboratory positions (..., 3) of pixel centres for integer (panel, fast, slow) indices."""
        tables = self.tables(fast_index.device)
        panel_index = torch.as_tensor(panel_index, device=fast_index.device).long()
        pixel = tables["pixel"][panel_index]
        fast_mm = ((fast_index.to(torch.float64) + 0.5) * pixel)[..., None]
        slow_mm = ((slow_index.to(torch.float64) + 0.5) * pixel)[..., None]
        return tables["origin"][panel_index] + fast_mm * tables["fast"][panel_index] + slow_mm * tables["slow"][panel_index]

    def project_directions_px(self, directions: torch.Tensor):
        """Where rays along ``directions`` (N, 3) meet every panel's plane.

        Returns fast and slow pixel coordinates (P, N), whether the ray travels towards the plane
        (P, N), the cosine between the ray and the plane's normal (P, N, positive towards it) and the
        planes' distances from the sample (P,).
        """
        tables = self.tables(directions.device, directions.dtype)
        origin, normal = tables["origin"], tables["normal"]
        plane = (origin * normal).sum(-1)  # (P,)
        # Orient each normal towards the panel as seen from the sample.
        facing = torch.where(plane < 0, -torch.ones_like(plane), torch.ones_like(plane))
        cos_normal = (directions @ normal.T).T * facing[:, None]
        towards = cos_normal > 1e-12
        scale = (plane * facing)[:, None] / torch.where(towards, cos_normal, torch.ones_like(cos_normal))
        hit = directions[None, :, :] * scale[..., None] - origin[:, None, :]
        fast_px = (hit * tables["fast"][:, None, :]).sum(-1) / tables["pixel"][:, None]
        slow_px = (hit * tables["slow"][:, None, :]).sum(-1) / tables["pixel"][:, None]
        return fast_px, slow_px, towards, cos_normal, plane * facing

    def beam_centre_px(self) -> np.ndarray:
        """(P, 2) fast, slow pixel coordinates where the direct beam meets each panel's plane (NaN
        where the beam runs parallel to a plane or away from it)."""
        fast, slow, towards, _, _ = self.project_directions_px(
            torch.as_tensor([BEAM_DIRECTION], dtype=torch.float64))
        centre = torch.stack((fast[:, 0], slow[:, 0]), dim=1).numpy().copy()
        centre[~towards[:, 0].numpy()] = np.nan
        return centre

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_single(cls, detector: Detector) -> "MultiPanelDetector":
        """The single axis-aligned panel of ``detector`` as a one-panel multi-panel detector."""
        return cls([Panel(tuple(float(v) for v in detector.origin_mm), FAST_AXIS, SLOW_AXIS,
                          float(detector.pixel_size_mm), int(detector.n_fast), int(detector.n_slow),
                          float(detector.thickness_mm), float(detector.attenuation_length_mm))])

    @classmethod
    def split(cls, detector: Detector, n_fast_tiles: int = 2, n_slow_tiles: int = 2, gap_px: int = 0,
              shift_px: float = 0.0, seed: int = 0) -> "MultiPanelDetector":
        """``detector`` cut into ``n_fast_tiles x n_slow_tiles`` panels.

        Without gaps or shifts the tiles abut and together hold exactly the single panel's pixels:
        tile (i, j)'s pixel (x, y) is the panel's pixel (x + x0_i, y + y0_j). ``gap_px`` drops that
        many pixels between neighbouring tiles (the tiles shrink, their pixels stay in place);
        ``shift_px`` moves each tile in its plane by a uniform random amount up to that many pixels
        along fast and slow (seeded).
        """
        rng = np.random.default_rng(seed)
        origin = np.asarray(detector.origin_mm, dtype=np.float64)
        pixel = float(detector.pixel_size_mm)
        fast_edges = np.linspace(0, detector.n_fast, n_fast_tiles + 1).round().astype(int)
        slow_edges = np.linspace(0, detector.n_slow, n_slow_tiles + 1).round().astype(int)
        panels = []
        for j in range(n_slow_tiles):
            for i in range(n_fast_tiles):
                x0, x1 = fast_edges[i] + (gap_px + 1) // 2 * (i > 0), fast_edges[i + 1] - gap_px // 2 * (i < n_fast_tiles - 1)
                y0, y1 = slow_edges[j] + (gap_px + 1) // 2 * (j > 0), slow_edges[j + 1] - gap_px // 2 * (j < n_slow_tiles - 1)
                offset = rng.uniform(-shift_px, shift_px, 2) if shift_px else np.zeros(2)
                corner = (origin + (x0 + offset[0]) * pixel * np.asarray(FAST_AXIS)
                          + (y0 + offset[1]) * pixel * np.asarray(SLOW_AXIS))
                panels.append(Panel(tuple(corner), FAST_AXIS, SLOW_AXIS, pixel, int(x1 - x0), int(y1 - y0),
                                    float(detector.thickness_mm), float(detector.attenuation_length_mm),
                                    name=f"tile_{j}_{i}"))
        return cls(panels)

    @classmethod
    def from_dxtbx(cls, dxtbx_detector, thickness_mm: float | None = None,
                   attenuation_length_mm: float | None = None) -> "MultiPanelDetector":
        """The panels of a dxtbx detector (hierarchy resolved: every panel's laboratory frame).

        Thickness and attenuation length come from each panel (``get_thickness``, 1 / ``get_mu``)
        unless given; a panel with mu 0 gets attenuation length 1 mm (then a thickness of 0 means
        a perfect absorber, as in :func:`capture_fraction`).
        """
        panels = []
        for index, panel in enumerate(dxtbx_detector):
            pixel_fast, pixel_slow = panel.get_pixel_size()
            if abs(pixel_fast - pixel_slow) > 1e-9:
                raise ValueError(f"panel {index}: pixels are not square ({pixel_fast} x {pixel_slow} mm)")
            n_fast, n_slow = panel.get_image_size()
            mu = float(panel.get_mu())
            panels.append(Panel(
                tuple(float(v) for v in panel.get_origin()), tuple(float(v) for v in panel.get_fast_axis()),
                tuple(float(v) for v in panel.get_slow_axis()), float(pixel_fast), int(n_fast), int(n_slow),
                float(panel.get_thickness()) if thickness_mm is None else float(thickness_mm),
                (1.0 / mu if mu > 0 else 1.0) if attenuation_length_mm is None else float(attenuation_length_mm),
                name=str(panel.get_name())))
        return cls(panels)

    def moved(self, shift_px: float = 0.0, seed: int = 0,
              offset_px: tuple[float, float] = (0.0, 0.0)) -> "MultiPanelDetector":
        """The detector with every panel moved in its own plane by a uniform random amount up to
        ``shift_px`` pixels along its fast and slow axes (seeded, one draw per panel in order, as
        :meth:`split` draws them), and then all panels moved together so that the direct beam meets
        the detector ``offset_px`` pixels further along the laboratory ``FAST_AXIS`` and ``SLOW_AXIS``
        (the single panel's :meth:`Detector.with_beam_center_offset_px`)."""
        rng = np.random.default_rng(seed)
        pixel = self.pixel_size_mm
        whole = -pixel * (offset_px[0] * np.asarray(FAST_AXIS) + offset_px[1] * np.asarray(SLOW_AXIS))
        panels = []
        for panel in self.panels:
            move = rng.uniform(-shift_px, shift_px, 2) if shift_px else np.zeros(2)
            origin = (np.asarray(panel.origin_mm) + whole + pixel * (move[0] * np.asarray(panel.fast_axis)
                                                                    + move[1] * np.asarray(panel.slow_axis)))
            panels.append(Panel(tuple(float(v) for v in origin), panel.fast_axis, panel.slow_axis, panel.pixel_size_mm,
                                panel.n_fast, panel.n_slow, panel.thickness_mm, panel.attenuation_length_mm,
                                name=panel.name))
        return MultiPanelDetector(panels, self.shift_mm)

    @classmethod
    def from_file(cls, path, **sensor) -> "MultiPanelDetector":
        """The detector of an ``.expt`` (its first detector) or of any image file dxtbx reads (its first
        image's). ValueError with one line naming ``path`` when neither reads it."""
        path = str(path)
        if path.endswith((".expt", ".json")):
            try:
                return cls.from_expt(path, **sensor)
            except (OSError, RuntimeError, ValueError, KeyError, IndexError) as error:
                raise ValueError(f"{path}: not an experiment list with a detector ({str(error).splitlines()[0]})") from None
        from dxtbx.model.experiment_list import ExperimentListFactory

        try:
            experiments = ExperimentListFactory.from_filenames([path])
        except Exception as error:  # dxtbx raises Sorry and assorted errors for files it cannot read
            raise ValueError(f"{path}: dxtbx cannot read it ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        if not len(experiments.detectors()):
            raise ValueError(f"{path}: dxtbx reads no detector from it")
        return cls.from_dxtbx(experiments.detectors()[0], **sensor)

    @classmethod
    def from_expt(cls, path, **sensor) -> "MultiPanelDetector":
        """The detector of the first experiment (or the only detector) of an ``.expt`` file."""
        from dxtbx.model.experiment_list import ExperimentListFactory

        experiments = ExperimentListFactory.from_json_file(str(path), check_format=False)
        return cls.from_dxtbx(experiments.detectors()[0], **sensor)


def cspad_like_layout(distance_mm: float = 100.0, pixel_size_mm: float = 0.10992, tile_shape=(194, 185),
                      gap_px: int = 6, shift_px: float = 1.0, tilt_deg: float = 0.2, seed: int = 0,
                      thickness_mm: float = 0.5, attenuation_length_mm: float = 0.3) -> MultiPanelDetector:
    """A CSPAD-like 64-tile detector: four quadrants of 4 x 4 tiles, each quadrant turned by 90 degrees about the beam from the last, round a
    central hole; every tile moved in-plane by up to ``shift_px`` and turned by up to ``tilt_deg``
    about its normal (seeded). Tiles are ``tile_shape`` (fast, slow) pixels, ``gap_px`` apart."""
    rng = np.random.default_rng(seed)
    n_fast, n_slow = tile_shape
    step_fast = (n_fast + gap_px) * pixel_size_mm
    step_slow = (n_slow + gap_px) * pixel_size_mm
    hole = 2 * gap_px * pixel_size_mm
    panels = []
    for quadrant in range(4):
        angle = quadrant * np.pi / 2
        turn = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
        for column in range(4):
            for row in range(4):
                # Tile corner in the quadrant's own frame (x right, y up, quadrant in x > 0, y > 0).
                centre = np.array([hole + (column + 0.5) * step_fast, hole + (row + 0.5) * step_slow, 0.0])
                centre[:2] += rng.uniform(-shift_px, shift_px, 2) * pixel_size_mm
                tilt = np.radians(rng.uniform(-tilt_deg, tilt_deg))
                fast = np.array([np.cos(tilt), np.sin(tilt), 0.0])
                slow = np.array([np.sin(tilt), -np.cos(tilt), 0.0])
                fast, slow, centre = turn @ fast, turn @ slow, turn @ centre
                corner = centre - 0.5 * n_fast * pixel_size_mm * fast - 0.5 * n_slow * pixel_size_mm * slow
                corner[2] = -distance_mm
                panels.append(Panel(tuple(corner), tuple(fast), tuple(slow), pixel_size_mm, n_fast, n_slow,
                                    thickness_mm, attenuation_length_mm, name=f"q{quadrant}_s{column}_{row}"))
    return MultiPanelDetector(panels)


def multipanel_solid_angle_sr(positions_mm: torch.Tensor, normal: torch.Tensor, pixel_mm: torch.Tensor) -> torch.Tensor:
    """Solid angle of pixels of tilted panels: area * |cos(obliquity)| / r^2, per pixel's own normal."""
    radius = torch.linalg.norm(positions_mm, dim=-1)
    return pixel_mm ** 2 * torch.abs((positions_mm * normal).sum(-1)) / radius ** 3


def multipanel_capture_fraction(unit_directions: torch.Tensor, normal: torch.Tensor, thickness_mm: torch.Tensor,
                                attenuation_length_mm: torch.Tensor) -> torch.Tensor:
    """:func:`capture_fraction` with each pixel's own panel normal and sensor (thickness 0: fraction 1)."""
    cos_obliquity = torch.abs((unit_directions * normal).sum(-1))
    capture = 1 - torch.exp(-thickness_mm / (attenuation_length_mm * cos_obliquity))
    return torch.where(thickness_mm > 0, capture, torch.ones_like(capture))
