"""The parameters of the per-shot pixel refinement and how they become the forward model's inputs.

Parameters, in the order of :data:`PARAMETER_NAMES`, in physical units:

``G``
    Overall scale: the forward model's ``CrystalState.scale`` for a square beam of side
    :data:`REFERENCE_BEAM_SIZE_M` (3 um, LY99's). With absolute amplitudes it is the number of mosaic
    domains in the illuminated crystal (93.75 in LY99, hence LY99's starting value 100). G is
    relative: the merged MTZ's IMEAN has an arbitrary overall scale c (IMEAN = c |F|^2 on average),
    and G absorbs it (G_refined = G_true / c). To compare with the truth, fit the one number c over
    all shots (e.g. the median of G_true / G_refined) and compare c * G_refined with G_true shot by
    shot; every LY99 crystal has the same true G, so the spread of G_refined / median(G_refined)
    measures the same thing without the truth.
``rot_x_deg``, ``rot_y_deg``, ``rot_z_deg``
    Small rotations (degrees) about the laboratory x, y and z axes, applied after the start
    orientation: U = Rx Ry Rz U0 (diffBragg's RotXYZ).
``a``, ``b``, ``c`` (Angstrom), ``beta_deg``
    The cell. For a monoclinic crystal (unique axis b, alpha = gamma = 90 degrees: LY99's C2) all four
    are free. Other crystal systems (:class:`CellModel`, from the lattice's space group) keep their
    symmetry: orthorhombic refines a, b, c (beta 90); tetragonal and hexagonal (also trigonal on
    hexagonal axes; gamma 120) refine a and c, with b = a; cubic refines a, with b = c = a. Tied and
    fixed ones are not refined, and the tables report b = a (and c = a) for them. Triclinic and
    rhombohedral-axes cells are refused (StartModelError).
``Na``, ``Nb``, ``Nc``
    Unit cells per mosaic domain along a, b and c (the Gaussian lattice transform's N).
``eta_deg``
    Mosaic spread: the root-mean-square rotation angle of the mosaic domains (degrees), the sigma of
    the simulator's normally distributed domain angles (0.86 of nanoBragg's spread). When eta is
    refined the crystal is either averaged in closed form over rotations of that RMS angle
    (``eta_model: analytic``, :func:`mosaic_nodes`) or split into ``mosaic_domains`` domains
    (``eta_model: domains``); otherwise it is one domain and eta is 0.
``detz_shift_mm``
    Detector distance shift (mm); positive moves the panel away from the sample.

The real-space matrix (rows a, b, c in the laboratory frame, dxtbx's convention) is
``A = B(a, b, c, beta) U0^T R^T``, with B the PDB-convention orthogonalisation (a along x, b in
the xy plane) and U0 the start crystal's orientation, so the start parameters give back the start
crystal. The refinement works on scaled parameters x = (p - p_start) / step (:data:`STEPS`), so
that one unit is a comparable, small change of every parameter for the quasi-Newton method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.special
import torch

from xfel_spread.config import ConfigError, fill_defaults, first_problem, load_schema
from xfel_spread.sim import crystal as xtal
from xfel_spread.sim.forward import CrystalState
from xfel_spread.sim.geometry import Detector, MultiPanelDetector

#: Side of the square beam the forward model is evaluated with; G is defined relative to it.
REFERENCE_BEAM_SIZE_M = 3e-6

PARAMETER_NAMES = ("G", "rot_x_deg", "rot_y_deg", "rot_z_deg", "a", "b", "c", "beta_deg",
                   "Na", "Nb", "Nc", "eta_deg", "detz_shift_mm")
#: The config's parameter groups (``stage1.refine``) and the parameters each switches on.
GROUPS = {
    "G": ("G",),
    "rotation": ("rot_x_deg", "rot_y_deg", "rot_z_deg"),
    "cell": ("a", "b", "c", "beta_deg"),
    "ncells": ("Na", "Nb", "Nc"),
    "eta": ("eta_deg",),
    "detz_shift": ("detz_shift_mm",),
}
INDEX = {name: position for position, name in enumerate(PARAMETER_NAMES)}
ROTATION = slice(INDEX["rot_x_deg"], INDEX["rot_z_deg"] + 1)
CELL = slice(INDEX["a"], INDEX["beta_deg"] + 1)
NCELLS = slice(INDEX["Na"], INDEX["Nc"] + 1)
#: Parameters of the spots' shape rather than their position (see ``refinement_passes``).
SHAPE_PARAMETERS = ("Na", "Nb", "Nc", "eta_deg")

#: One scaled unit of each parameter, absolute (degrees, mm) or relative to its start value. On
#: simulated LY99 shots (Fisher information of the shoebox pixels) a step of each changes the NLL by
#: about as much as any other, so the scaled problem is well conditioned for L-BFGS-B.
STEPS = {"rotation_deg": 0.001, "eta_deg": 0.002, "detz_shift_mm": 0.005,
         "G_relative": 0.03, "cell_relative": 1e-4, "ncells_relative": 0.02}

#: Largest departure of the start cell's alpha and gamma from 90 degrees accepted as monoclinic.
MONOCLINIC_TOLERANCE_DEG = 0.1
#: Seed of the fixed set of mosaic-domain rotation axes and angles (the same for every shot).
MOSAIC_SEED = 20240607


class StartModelError(ValueError):
    """A start crystal the cell parameterisation cannot describe."""


@dataclass(frozen=True)
class Stage1Settings:
    """The ``stage1`` config section, defaults filled and checked (see the schema for each key)."""

    structure_factors: str
    shoebox_size_px: int
    readout_sigma_adu: float
    plane_holds_bragg: bool | None
    refine: tuple[str, ...]
    initial_G: float | None
    initial_ncells: tuple[float, float, float]
    initial_eta_deg: float
    bounds_G: tuple[float, float]
    bounds_rotation_deg: tuple[float, float]
    bounds_cell_fraction: float
    bounds_ncells: tuple[float, float]
    bounds_eta_deg: tuple[float, float]
    bounds_detz_shift_mm: tuple[float, float]
    restraint_cell_a: float | None
    restraint_ncells: float | None
    mosaic_domains: int
    eta_model: str
    free_domains: int
    free_domains_max_iterations: int
    free_domains_starts: int
    mosaic_model: str
    broad_start_ncells: float | None
    broad_start: str
    max_iterations: int
    device: str
    batch_shots: int

    @classmethod
    def from_config(cls, section: Mapping | None = None, source: str = "<stage1 settings>") -> "Stage1Settings":
        """Settings from the ``stage1`` section (absent keys take the schema's defaults).

        Raises ConfigError (one line, ``source: stage1.key: problem``) for values the schema or the
        refinement cannot use.
        """
        schema = load_schema()["properties"]["stage1"]
        filled = fill_defaults(dict(section or {}), schema)
        problem = first_problem(filled, schema)
        if problem is not None:
            raise ConfigError(f"{source}: stage1.{problem}")
        bounds, initial, restraints = filled["bounds"], filled["initial"], filled["restraints"]
        settings = cls(
            structure_factors=filled["structure_factors"],
            shoebox_size_px=filled["shoebox_size_px"],
            readout_sigma_adu=float(filled["readout_sigma_adu"]),
            plane_holds_bragg=filled["plane_holds_bragg"],
            refine=tuple(filled["refine"]),
            initial_G=None if initial["G"] is None else float(initial["G"]),
            initial_ncells=tuple(float(v) for v in initial["ncells"]),
            initial_eta_deg=float(initial["eta_deg"]),
            bounds_G=_pair(bounds["G"]),
            bounds_rotation_deg=_pair(bounds["rotation_deg"]),
            bounds_cell_fraction=float(bounds["cell_fraction"]),
            bounds_ncells=_pair(bounds["ncells"]),
            bounds_eta_deg=_pair(bounds["eta_deg"]),
            bounds_detz_shift_mm=_pair(bounds["detz_shift_mm"]),
            restraint_cell_a=restraints["cell_a"],
            restraint_ncells=restraints["ncells"],
            mosaic_domains=filled["mosaic_domains"],
            eta_model=filled["eta_model"],
            free_domains=filled["free_domains"],
            free_domains_max_iterations=filled["free_domains_max_iterations"],
            free_domains_starts=filled["free_domains_starts"],
            mosaic_model=filled["mosaic_model"],
            broad_start_ncells=(None if filled["broad_start_ncells"] is None
                                else float(filled["broad_start_ncells"])),
            broad_start=filled["broad_start"],
            max_iterations=filled["max_iterations"],
            device=filled["device"],
            batch_shots=filled["batch_shots"],
        )
        problem = settings.first_inconsistency()
        if problem is not None:
            raise ConfigError(f"{source}: stage1.{problem}")
        return settings

    def first_inconsistency(self) -> str | None:
        """``"key: problem"`` for values the schema accepts but that do not fit together, or None."""
        for key, (low, high) in (("bounds.G", self.bounds_G), ("bounds.rotation_deg", self.bounds_rotation_deg),
                                 ("bounds.ncells", self.bounds_ncells), ("bounds.eta_deg", self.bounds_eta_deg),
                                 ("bounds.detz_shift_mm", self.bounds_detz_shift_mm)):
            if low > high:
                return f"{key}: lower bound {low:g} is above upper bound {high:g}"
        if not all(self.bounds_ncells[0] <= n <= self.bounds_ncells[1] for n in self.initial_ncells):
            return f"initial.ncells: {list(self.initial_ncells)} is outside bounds.ncells {list(self.bounds_ncells)}"
        if not self.bounds_eta_deg[0] <= self.initial_eta_deg <= self.bounds_eta_deg[1]:
            return f"initial.eta_deg: {self.initial_eta_deg:g} is outside bounds.eta_deg {list(self.bounds_eta_deg)}"
        if self.initial_G is not None and not self.bounds_G[0] <= self.initial_G <= self.bounds_G[1]:
            return f"initial.G: {self.initial_G:g} is outside bounds.G {list(self.bounds_G)}"
        for key, (low, high) in (("bounds.rotation_deg", self.bounds_rotation_deg),
                                 ("bounds.detz_shift_mm", self.bounds_detz_shift_mm)):
            if not low <= 0 <= high:
                return f"{key}: the range must contain 0 (the start)"
        if not self.bounds_G[1] > 0:
            return f"bounds.G: the upper bound must be positive, got {self.bounds_G[1]:g}"
        if "eta" in self.refine and self.eta_model == "domains" and self.mosaic_domains < 2:
            return "mosaic_domains: refining eta needs at least 2 mosaic domains"
        if self.free_domains == 1:
            return "free_domains: 1 domain is the crystal itself; give 0 (off) or at least 2"
        if self.broad_start == "always" and self.broad_start_ncells is None:
            return "broad_start: always needs broad_start_ncells (null turns the broad-spot start off)"
        return None

    def torch_device(self) -> torch.device:
        """The device ``device`` names (auto: cuda when torch sees one, else cpu)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("<stage1 settings>: stage1.device: cuda, but torch sees no CUDA device")
        return torch.device(self.device)

    @property
    def refined_names(self) -> tuple[str, ...]:
        """Names of the refined parameters, in :data:`PARAMETER_NAMES` order."""
        switched_on = {name for group in self.refine for name in GROUPS[group]}
        return tuple(name for name in PARAMETER_NAMES if name in switched_on)

    @property
    def broad_ncells(self) -> float | None:
        """N of the broad-spot pass (``broad_start_ncells`` inside ``bounds.ncells``), or None."""
        if self.broad_start_ncells is None:
            return None
        return float(np.clip(self.broad_start_ncells, *self.bounds_ncells))

    @property
    def n_domains(self) -> int:
        """Mosaic domains of the model: ``mosaic_domains`` when eta is refined with sampled domains,
        else one."""
        return self.mosaic_domains if "eta" in self.refine and self.eta_model == "domains" else 1

    @property
    def analytic_mosaic(self) -> bool:
        """True when eta is refined with the analytic average over the rotations (``eta_model: analytic``)."""
        return "eta" in self.refine and self.eta_model == "analytic"


def _pair(values) -> tuple[float, float]:
    return float(values[0]), float(values[1])


# ---------------------------------------------------------------------------------------------
# Parameter space: start values, bounds, steps, restraints


@dataclass
class ParameterSpace:
    """Start, bounds, step (one scaled unit), refined flags and restraint sigmas of the 13 parameters.

    Arrays are in :data:`PARAMETER_NAMES` order, physical units. Restraint sigmas are ``inf`` for
    unrestrained parameters.
    """

    start: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    step: np.ndarray
    refined: np.ndarray
    restraint_sigma: np.ndarray

    @property
    def refined_index(self) -> np.ndarray:
        return np.flatnonzero(self.refined)

    @property
    def n_refined(self) -> int:
        return int(self.refined.sum())

    def scaled_bounds(self) -> list[tuple[float, float]]:
        """Bounds of the scaled refined parameters, for L-BFGS-B."""
        index = self.refined_index
        low = (self.lower[index] - self.start[index]) / self.step[index]
        high = (self.upper[index] - self.start[index]) / self.step[index]
        return list(zip(low.tolist(), high.tolist()))

    def physical(self, scaled: torch.Tensor) -> torch.Tensor:
        """All 13 physical values (torch, differentiable in ``scaled``) from the scaled refined ones."""
        start = torch.as_tensor(self.start, dtype=scaled.dtype, device=scaled.device)
        step = torch.as_tensor(self.step[self.refined_index], dtype=scaled.dtype, device=scaled.device)
        index = torch.as_tensor(self.refined_index, device=scaled.device)
        return start.index_add(0, index, step * scaled)

    def values(self, scaled: np.ndarray) -> np.ndarray:
        """Physical values (numpy) of scaled refined parameters, clipped into the bounds."""
        values = self.start.copy()
        index = self.refined_index
        values[index] = self.start[index] + self.step[index] * np.asarray(scaled, dtype=np.float64)
        return np.clip(values, self.lower, self.upper)

    def scaled(self, values: np.ndarray) -> np.ndarray:
        """Scaled refined parameters of physical values (the inverse of :meth:`physical`)."""
        index = self.refined_index
        return (np.asarray(values, dtype=np.float64)[index] - self.start[index]) / self.step[index]

    def restraint_penalty(self, values: torch.Tensor) -> torch.Tensor:
        """Gaussian restraints towards the start: 0.5 * sum(((p - p_start) / sigma)^2) (0 when none)."""
        sigma = torch.as_tensor(self.restraint_sigma, dtype=values.dtype, device=values.device)
        start = torch.as_tensor(self.start, dtype=values.dtype, device=values.device)
        return 0.5 * (((values - start) / sigma) ** 2).sum()

    def with_refined(self, refined: np.ndarray) -> "ParameterSpace":
        """The same space refining only the parameters flagged in ``refined``."""
        return dataclasses.replace(self, refined=np.asarray(refined, dtype=bool))

    @staticmethod
    def as_dict(values) -> dict[str, float]:
        return {name: float(value) for name, value in zip(PARAMETER_NAMES, np.asarray(values, dtype=np.float64))}


def parameter_space(settings: Stage1Settings, start_cell: tuple[float, float, float, float],
                    start_G: float, free_cell: tuple[bool, bool, bool, bool] = (True, True, True, True)
                    ) -> ParameterSpace:
    """The parameter space of one shot: start cell (a, b, c, beta) from its crystal, start G;
    ``free_cell`` says which of a, b, c, beta the crystal's system lets the cell group refine."""
    eta_start = settings.initial_eta_deg if "eta" in settings.refine else 0.0
    start = np.array([start_G, 0.0, 0.0, 0.0, *start_cell, *settings.initial_ncells, eta_start, 0.0])
    cell_margin = settings.bounds_cell_fraction * np.abs(np.asarray(start_cell))
    lower = np.array([settings.bounds_G[0], *[settings.bounds_rotation_deg[0]] * 3,
                      *(np.asarray(start_cell) - cell_margin), *[settings.bounds_ncells[0]] * 3,
                      settings.bounds_eta_deg[0], settings.bounds_detz_shift_mm[0]])
    upper = np.array([settings.bounds_G[1], *[settings.bounds_rotation_deg[1]] * 3,
                      *(np.asarray(start_cell) + cell_margin), *[settings.bounds_ncells[1]] * 3,
                      settings.bounds_eta_deg[1], settings.bounds_detz_shift_mm[1]])
    step = np.array([STEPS["G_relative"] * abs(start_G), *[STEPS["rotation_deg"]] * 3,
                     *(STEPS["cell_relative"] * np.abs(np.asarray(start_cell))),
                     *(STEPS["ncells_relative"] * np.asarray(settings.initial_ncells)),
                     STEPS["eta_deg"], STEPS["detz_shift_mm"]])
    refined = np.array([name in settings.refined_names for name in PARAMETER_NAMES])
    refined[CELL] &= np.asarray(free_cell, dtype=bool)
    sigma = np.full(len(PARAMETER_NAMES), np.inf)
    if settings.restraint_cell_a is not None:
        sigma[INDEX["a"]:INDEX["c"] + 1] = settings.restraint_cell_a
    if settings.restraint_ncells is not None:
        sigma[NCELLS] = settings.restraint_ncells
    # Restraints act on refined parameters only; fixed ones sit at their start anyway.
    sigma[~refined] = np.inf
    return ParameterSpace(start, lower, upper, step, refined, sigma)


def refinement_passes(space: ParameterSpace, broad_ncells: float | None = None) -> list[ParameterSpace]:
    """The spaces refined one after the other: spot positions, then everything (broad spots first
    when ``broad_ncells`` is given).

    When spot shapes (N, eta) are refined together with what places the spots (G, rotation, cell,
    distance), a pass holds the shapes at their starts first. From a start a couple of pixels off,
    the likelihood otherwise falls fastest by broadening the spots: one N runs to its lower bound,
    turning the spots into streaks that cover the misplaced data, a minimum the refinement does not
    leave. The last pass refines every parameter from where the previous stopped.

    With ``broad_ncells`` (:attr:`Stage1Settings.broad_ncells`, the restart of a lost shot) a
    broad-spot pass comes first: the same positions, with N held at ``broad_ncells`` in place of its
    start, so that spots several pixels from their data still overlap it and the likelihood leads
    them there instead of sending G to 0 (or to its upper bound) with the spots out of their
    shoeboxes. Its space starts G at the value that keeps each spot's integrated photons
    (G N_a N_b N_c constant, :func:`enter_pass`).
    """
    shape = np.isin(np.array(PARAMETER_NAMES), SHAPE_PARAMETERS)
    positions = space.refined & ~shape
    passes = [space]
    if positions.any() and (space.refined & shape).any():
        passes = [space.with_refined(positions), space]
    if broad_ncells is not None and positions.any():
        broad = space.with_refined(positions)
        start, step = broad.start.copy(), broad.step.copy()
        start[NCELLS] = broad_ncells
        ratio = np.prod(space.start[NCELLS]) / np.prod(start[NCELLS])
        start[INDEX["G"]] *= ratio
        step[INDEX["G"]] *= ratio
        passes.insert(0, dataclasses.replace(broad, start=start, step=step))
    return passes


def enter_pass(values: np.ndarray, space: ParameterSpace) -> np.ndarray:
    """Where a pass over ``space`` starts after a pass that ended at ``values`` (physical).

    Parameters the pass does not refine sit at its start (as :meth:`ParameterSpace.physical` has
    them); when that changes N, G is multiplied by the old N_a N_b N_c over the new one, which keeps
    every spot's integrated photons (the lattice transform's peak goes as (N_a N_b N_c)^2 and its
    volume as 1 / (N_a N_b N_c)).
    """
    entered = np.asarray(values, dtype=np.float64).copy()
    fixed = ~space.refined
    entered[fixed] = space.start[fixed]
    entered[INDEX["G"]] *= np.prod(values[NCELLS]) / np.prod(entered[NCELLS])
    return np.clip(entered, space.lower, space.upper)


# ---------------------------------------------------------------------------------------------
# Crystal: orientation, C2 cell, mosaic domains


def c2_cell(real_space_matrix: np.ndarray) -> tuple[float, float, float, float]:
    """(a, b, c, beta) of a monoclinic (unique axis b) real-space matrix; StartModelError otherwise."""
    a, b, c, alpha, beta, gamma = xtal.unit_cell_from_matrix(np.asarray(real_space_matrix, dtype=np.float64))
    if abs(alpha - 90) > MONOCLINIC_TOLERANCE_DEG or abs(gamma - 90) > MONOCLINIC_TOLERANCE_DEG:
        raise StartModelError(f"start cell is not monoclinic with unique axis b (alpha {alpha:.3f}, "
                              f"gamma {gamma:.3f} degrees)")
    return a, b, c, beta


def c2_orthogonalization(cell: torch.Tensor) -> torch.Tensor:
    """Rows a, b, c of the C2 cell (a, b, c, beta_deg) in the PDB convention, differentiable."""
    a, b, c, beta_deg = cell[0], cell[1], cell[2], cell[3]
    beta = torch.deg2rad(beta_deg)
    zero = torch.zeros_like(a)
    return torch.stack((torch.stack((a, zero, zero)),
                        torch.stack((zero, b, zero)),
                        torch.stack((c * torch.cos(beta), zero, c * torch.sin(beta)))))


def orthogonalization(a, b, c, alpha_deg, beta_deg, gamma_deg) -> torch.Tensor:
    """Rows a, b, c of any cell in the PDB convention (a along x, b in the xy plane), differentiable in
    the torch scalars among the arguments (the others are floats)."""
    a = torch.as_tensor(a, dtype=torch.float64)
    like = dict(dtype=a.dtype, device=a.device)
    b, c = torch.as_tensor(b, **like), torch.as_tensor(c, **like)
    alpha, beta, gamma = (torch.deg2rad(torch.as_tensor(angle, **like)) for angle in (alpha_deg, beta_deg, gamma_deg))
    zero = torch.zeros_like(a)
    c_y = c * (torch.cos(alpha) - torch.cos(beta) * torch.cos(gamma)) / torch.sin(gamma)
    c_z = torch.sqrt(c ** 2 - (c * torch.cos(beta)) ** 2 - c_y ** 2)
    return torch.stack((torch.stack((a, zero, zero)),
                        torch.stack((b * torch.cos(gamma), b * torch.sin(gamma), zero)),
                        torch.stack((c * torch.cos(beta), c_y, c_z))))


#: Crystal systems of :class:`CellModel`: which of a, b, c, beta are free, whether b and c are a, and
#: the fixed alpha and gamma (degrees).
CELL_SYSTEMS = {
    "monoclinic": ((True, True, True, True), False, False, 90.0, 90.0),
    "orthorhombic": ((True, True, True, False), False, False, 90.0, 90.0),
    "tetragonal": ((True, False, True, False), True, False, 90.0, 90.0),
    "hexagonal": ((True, False, True, False), True, False, 90.0, 120.0),
    "cubic": ((True, False, False, False), True, True, 90.0, 90.0),
}
#: Largest relative difference of lengths the symmetry ties (b = a, c = a) in a start cell.
TIED_LENGTH_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CellModel:
    """How the four cell parameters (a, b, c, beta_deg) of :data:`PARAMETER_NAMES` make a crystal's cell
    in its crystal system (see the module docstring); built by :meth:`from_crystal`."""

    system: str
    start_cell: tuple[float, float, float, float]

    @property
    def free(self) -> tuple[bool, bool, bool, bool]:
        return CELL_SYSTEMS[self.system][0]

    @classmethod
    def from_crystal(cls, real_space_matrix: np.ndarray, space_group: str | None = None) -> "CellModel":
        """The cell model of a start crystal (rows a, b, c) of ``space_group`` (a symbol cctbx reads;
        None: monoclinic, LY99's). StartModelError when the start cell does not have its system's shape."""
        a, b, c, alpha, beta, gamma = xtal.unit_cell_from_matrix(np.asarray(real_space_matrix, dtype=np.float64))
        system = "monoclinic" if space_group is None else _crystal_system(space_group, gamma)
        if system == "monoclinic":
            return cls(system, c2_cell(real_space_matrix))
        _, b_is_a, c_is_a, alpha_fixed, gamma_fixed = CELL_SYSTEMS[system]
        angles = (alpha - alpha_fixed, beta - 90.0, gamma - gamma_fixed)
        tied = [b / a - 1 if b_is_a else 0.0, c / a - 1 if c_is_a else 0.0]
        if max(abs(v) for v in angles) > MONOCLINIC_TOLERANCE_DEG or max(abs(v) for v in tied) > TIED_LENGTH_TOLERANCE:
            raise StartModelError(f"start cell ({a:.3f} {b:.3f} {c:.3f} {alpha:.2f} {beta:.2f} {gamma:.2f}) does not "
                                  f"have the shape of its {system} space group {space_group}")
        return cls(system, (a, b, c, beta))

    def orthogonalization(self, cell: torch.Tensor) -> torch.Tensor:
        """Rows a, b, c (PDB convention) of the cell parameters ``cell`` (a, b, c, beta_deg), differentiable.
        Monoclinic is :func:`c2_orthogonalization` itself."""
        if self.system == "monoclinic":
            return c2_orthogonalization(cell)
        _, b_is_a, c_is_a, alpha, gamma = CELL_SYSTEMS[self.system]
        a = cell[0]
        return orthogonalization(a, a if b_is_a else cell[1], a if c_is_a else cell[2], alpha, 90.0, gamma)

    def tied(self, values: np.ndarray) -> np.ndarray:
        """``values`` (:data:`PARAMETER_NAMES` order) with b (and c) set to a where the system ties them."""
        _, b_is_a, c_is_a, _, _ = CELL_SYSTEMS[self.system]
        values = np.array(values, dtype=np.float64)
        if b_is_a:
            values[INDEX["b"]] = values[INDEX["a"]]
        if c_is_a:
            values[INDEX["c"]] = values[INDEX["a"]]
        return values


def _crystal_system(space_group: str, gamma_deg: float) -> str:
    """The :data:`CELL_SYSTEMS` key of a space group (trigonal on hexagonal axes is hexagonal)."""
    from cctbx import sgtbx

    try:
        system = sgtbx.space_group_info(space_group).group().crystal_system().lower()
    except RuntimeError:
        raise StartModelError(f"space group {space_group!r}: cctbx does not read it") from None
    if system == "trigonal":
        if abs(gamma_deg - 120.0) > MONOCLINIC_TOLERANCE_DEG:
            raise StartModelError(f"space group {space_group} on rhombohedral axes: stage 1's cell model takes "
                                  "trigonal crystals on hexagonal axes only")
        return "hexagonal"
    if system not in CELL_SYSTEMS:
        raise StartModelError(f"space group {space_group} is {system}: stage 1's cell model covers monoclinic to "
                              "cubic crystals")
    return system


def rotation_xyz(angles_deg: torch.Tensor) -> torch.Tensor:
    """Rx(x) Ry(y) Rz(z) for angles in degrees about the laboratory axes, differentiable."""
    cos, sin = torch.cos(torch.deg2rad(angles_deg)), torch.sin(torch.deg2rad(angles_deg))
    one, zero = torch.ones_like(cos[0]), torch.zeros_like(cos[0])
    rx = torch.stack((torch.stack((one, zero, zero)), torch.stack((zero, cos[0], -sin[0])),
                      torch.stack((zero, sin[0], cos[0]))))
    ry = torch.stack((torch.stack((cos[1], zero, sin[1])), torch.stack((zero, one, zero)),
                      torch.stack((-sin[1], zero, cos[1]))))
    rz = torch.stack((torch.stack((cos[2], -sin[2], zero)), torch.stack((sin[2], cos[2], zero)),
                      torch.stack((zero, zero, one))))
    return rx @ ry @ rz


def start_orientation(real_space_matrix: np.ndarray, cell: tuple[float, float, float, float],
                      cell_model: CellModel | None = None) -> np.ndarray:
    """U0, the rotation that turns the cell's PDB-convention vectors (``cell_model``'s; None: the C2
    cell's) into the start crystal's.

    The start matrix satisfies A0^T = U0 B^T exactly when its cell has exactly its system's shape;
    the nearest rotation (polar decomposition) absorbs rounding in the fixed angles.
    """
    build = c2_orthogonalization if cell_model is None else cell_model.orthogonalization
    b_matrix = build(torch.as_tensor(cell, dtype=torch.float64)).numpy()
    rotation = xtal.nearest_rotation(np.asarray(real_space_matrix, dtype=np.float64).T @ np.linalg.inv(b_matrix.T))
    if np.linalg.det(rotation) < 0:
        raise StartModelError("start crystal has a left-handed basis (det A < 0)")
    return rotation


def mosaic_domain_set(n_domains: int, seed: int = MOSAIC_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed rotation axes (D, 3) and unit angles (D,) of the mosaic domains.

    Axes are uniform on the sphere and angles normal, as the simulator draws them, but in +/-
    pairs (and one unrotated domain when D is odd) so that the domains' mean orientation is the
    crystal's, and scaled so that their root-mean-square angle is exactly 1: domain d turns by
    ``eta * angle[d]`` about ``axis[d]``, so eta is the RMS angle.
    """
    if n_domains == 1:
        return np.array([[0.0, 0.0, 1.0]]), np.zeros(1)
    rng = np.random.default_rng(seed)
    n_pairs = n_domains // 2
    axes = rng.standard_normal((n_pairs, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.abs(rng.standard_normal(n_pairs))
    axes = np.concatenate((axes, axes))
    angles = np.concatenate((angles, -angles))
    if n_domains % 2:
        axes = np.concatenate((axes, [[0.0, 0.0, 1.0]]))
        angles = np.concatenate((angles, [0.0]))
    return axes, angles / np.sqrt(np.mean(angles ** 2))


#: Quantiles at which :func:`mosaic_nodes` takes each mosaic draw's rotation angles.
MOSAIC_NODE_QUANTILES = {"gaussian": (0.25, 0.75), "nanobragg": (0.5,)}


def mosaic_nodes(mosaic_model: str) -> np.ndarray:
    """Rotation angles, in units of their RMS eta, whose analytic averages (equal weights) stand for
    the simulator's draw ``mosaic_model`` (:func:`xfel_spread.sim.crystal.mosaic_rotations`).

    Each node j turns the crystal by a small rotation vector of per-component variance
    (eta f_j)^2 / 3 (an angle eta f_j about an axis uniform on the sphere), averaged in closed form
    (:func:`xfel_spread.sim.forward.bragg_sum_mosaic`). The angles are the draw's quantiles
    :data:`MOSAIC_NODE_QUANTILES`, scaled so that their mean square is 1 (eta stays the RMS angle). The
    choice was measured against 4,000 drawn domains on a simulated shot (0.05 deg, 10 channels, N 57):
    the Gaussian draw (angles |N(0, s)|, peaked at 0) is matched to 2.5 % (relative L2 over the
    shoebox pixels) by two nodes and to 13 % by one; nanoBragg's (clustered near its spread) to 8 %
    by one node, more nodes doing no better. A model without any mosaic spread is 48-57 % off.
    """
    quantiles = np.asarray(MOSAIC_NODE_QUANTILES[mosaic_model])
    if mosaic_model == "gaussian":
        fractions = np.sqrt(2.0) * scipy.special.erfinv(quantiles)  # half-normal quantiles
    else:
        fractions = (1.0 - (1.0 - quantiles) ** 2) ** (1.0 / 3.0)  # CDF 1 - sqrt(1 - t^3)
    return fractions / np.sqrt(np.mean(fractions ** 2))


def cross_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """[v]_x (D, 3, 3) of vectors (D, 3): [v]_x y = v x y, differentiable."""
    x, y, z = vectors[:, 0], vectors[:, 1], vectors[:, 2]
    zero = torch.zeros_like(x)
    return torch.stack((torch.stack((zero, -z, y), -1), torch.stack((z, zero, -x), -1),
                        torch.stack((-y, x, zero), -1)), -2)


def axis_angle_rotations(axes: torch.Tensor, angles_rad: torch.Tensor) -> torch.Tensor:
    """Rotations (D, 3, 3) about unit ``axes`` (D, 3) by ``angles_rad`` (D,) (Rodrigues), differentiable."""
    cross = cross_matrices(axes)
    eye = torch.eye(3, dtype=axes.dtype, device=axes.device)
    return (eye + torch.sin(angles_rad)[:, None, None] * cross
            + (1 - torch.cos(angles_rad))[:, None, None] * cross @ cross)


class CrystalModel:
    """Real-space and mosaic-domain matrices of one shot's crystal from its parameter values.

    ``start_matrix`` is the start crystal (rows a, b, c, laboratory frame, Angstrom); it must be
    monoclinic with unique axis b (StartModelError otherwise).
    """

    def __init__(self, start_matrix: np.ndarray, n_domains: int, device="cpu", mosaic_model: str | None = None,
                 space_group: str | None = None):
        self.start_matrix = np.asarray(start_matrix, dtype=np.float64)
        #: The cell's parameterisation in the crystal's system (``space_group``; None: monoclinic).
        self.cell_model = CellModel.from_crystal(self.start_matrix, space_group)
        self.start_cell = self.cell_model.start_cell
        self.n_domains = n_domains
        #: With ``mosaic_model`` (gaussian or nanobragg) eta is an analytic average over the rotations
        #: (:func:`mosaic_nodes`); the crystal is then one domain.
        self.mosaic_fractions = (None if mosaic_model is None else
                                 torch.as_tensor(mosaic_nodes(mosaic_model), dtype=torch.float64, device=device))
        if self.mosaic_fractions is not None and n_domains != 1:
            raise ValueError("an analytic mosaic spread needs a single domain")
        orientation = start_orientation(self.start_matrix, self.start_cell, self.cell_model)
        self.orientation = torch.as_tensor(orientation, dtype=torch.float64, device=device)
        axes, angles = mosaic_domain_set(n_domains)
        self.domain_axes = torch.as_tensor(axes, dtype=torch.float64, device=device)
        self.domain_angles = torch.as_tensor(angles, dtype=torch.float64, device=device)

    def real_space_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """A = B(cell) U0^T R^T: rows a, b, c of the crystal (3, 3)."""
        rotation = rotation_xyz(values[ROTATION]) @ self.orientation
        return self.cell_model.orthogonalization(values[CELL]) @ rotation.T

    def domain_matrices(self, values: torch.Tensor) -> torch.Tensor:
        """Real-space matrices of the mosaic domains (D, 3, 3): each cell vector turned by its domain."""
        matrix = self.real_space_matrix(values)
        if self.n_domains == 1:
            return matrix[None]
        rotations = axis_angle_rotations(self.domain_axes, torch.deg2rad(values[INDEX["eta_deg"]]) * self.domain_angles)
        return torch.einsum("dij,rj->dri", rotations, matrix)

    def crystal_state(self, values: torch.Tensor) -> CrystalState:
        """The forward model's crystal: mosaic domains, N and scale G (and the rotation vectors'
        per-component variances of the analytic mosaic spread: (eta f_j)^2 / 3 for each node f_j)."""
        variance = None
        if self.mosaic_fractions is not None:
            variance = (torch.deg2rad(values[INDEX["eta_deg"]]) * self.mosaic_fractions) ** 2 / 3
        return CrystalState(self.domain_matrices(values), values[NCELLS], values[INDEX["G"]], variance)


def rotation_vector_matrices(vectors: torch.Tensor) -> torch.Tensor:
    """Rotations (D, 3, 3) of rotation vectors (D, 3; axis times angle, rad), differentiable at any angle
    (Rodrigues with sin(t)/t and (1 - cos t)/t^2; the angles are clamped at 1e-12 rad)."""
    angles = vectors.norm(dim=1).clamp_min(1e-12)
    cross = cross_matrices(vectors)
    eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
    return (eye + (torch.sin(angles) / angles)[:, None, None] * cross
            + ((1 - torch.cos(angles)) / angles ** 2)[:, None, None] * cross @ cross)


class FreeDomainCrystal(CrystalModel):
    """A crystal of D mosaic domains, each turned by its own free rotation vector (``stage1.free_domains``).

    ``vectors`` (D, 3, rad, laboratory frame) are set before each evaluation. They enter centred
    (their mean subtracted), so the crystal's own matrix (:meth:`real_space_matrix`) is the domains'
    mean orientation (the rotation nearest their average matrix) to third order in their angles:
    about 1e-9 rad at 0.05 deg. The crystal has no analytic mosaic average; N is each domain's.
    """

    def __init__(self, start_matrix: np.ndarray, n_domains: int, device="cpu", space_group: str | None = None):
        super().__init__(start_matrix, 1, device, None, space_group)
        self.n_domains = n_domains
        self.vectors = torch.zeros((n_domains, 3), dtype=torch.float64, device=device)
        #: When set, the crystal is that one domain alone (to weigh each domain's photons).
        self.selected: int | None = None

    def centred_vectors(self) -> torch.Tensor:
        return self.vectors - self.vectors.mean(dim=0)

    def domain_rotations(self) -> torch.Tensor:
        """The domains' rotations (D, 3, 3) about the crystal's orientation."""
        return rotation_vector_matrices(self.centred_vectors())

    def domain_matrices(self, values: torch.Tensor) -> torch.Tensor:
        matrices = torch.einsum("dij,rj->dri", self.domain_rotations(), self.real_space_matrix(values))
        return matrices if self.selected is None else matrices[self.selected:self.selected + 1]

    def rms_angle_deg(self) -> float:
        """The domains' root-mean-square rotation angle about their mean (degrees): eta's meaning."""
        return float(np.degrees(torch.sqrt((self.centred_vectors() ** 2).sum(dim=1).mean()).item()))


# ---------------------------------------------------------------------------------------------
# Detector distance


@dataclass(frozen=True)
class TensorDistanceDetector(Detector):
    """A Detector whose ``distance_mm`` is a torch scalar, so pixel positions carry its gradient.

    Only the origin changes: the forward model reads positions through ``pixel_centres_mm``
    (which takes ``origin_mm``) and the solid angle through ``distance_mm``.
    """

    @property
    def origin_mm(self) -> torch.Tensor:
        beam_x, beam_y = self.beam_center_mm
        distance = self.distance_mm
        return torch.stack((torch.full_like(distance, -beam_x), torch.full_like(distance, beam_y), -distance))


def shifted_detector(detector: Detector, shift_mm: torch.Tensor) -> Detector:
    """The detector moved along the beam by ``shift_mm`` (differentiable in the shift)."""
    if isinstance(detector, MultiPanelDetector):
        return detector.shifted(shift_mm)
    return TensorDistanceDetector(detector.n_fast, detector.n_slow, detector.pixel_size_mm,
                                  detector.distance_mm + shift_mm, tuple(detector.beam_center_mm),
                                  detector.thickness_mm, detector.attenuation_length_mm)
