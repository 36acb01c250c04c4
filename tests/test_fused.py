"""The compiled per-term loop of the sparse models (sim.fused, sim/pair_channel_sum.cpp): its sums equal
the eager torch loop's, and where it cannot be built or is switched off the eager loop runs after one
warning. The sparse-against-dense tests of test_forward_model.py run with both loops."""

import logging
import threading
import time

import pytest
import torch

from xfel_spread.sim import fused
from xfel_spread.sim.forward import ARG_CUTOFF, PairChannelSum


@pytest.fixture
def compiled(compiled_loop):
    """The built extension (conftest's ``compiled_loop``)."""
    return compiled_loop


@pytest.fixture
def fresh_state(monkeypatch):
    """Forget the process's outcome before and after (the test builds or fails its own)."""
    fused.reset()
    yield
    monkeypatch.undo()
    fused.reset()


class _Context:
    needs_input_grad = (True, True, True, False, False)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def rows(n: int, width: int, seed: int = 0):
    """Pairs like the free domains': padded channel rows of an LY99 band, centres inside them,
    curvatures and floors that leave some terms live, some beyond the cut-off, some padding."""
    generator = torch.Generator().manual_seed(seed)
    band = torch.linspace(0.139, 0.142, 100, dtype=torch.float64)
    first = torch.randint(0, 100 - width, (n, 1), generator=generator)
    u = band[first + torch.arange(width)]
    centre = u[:, width // 2] + 1e-5 * torch.randn(n, dtype=torch.float64, generator=generator)
    curvature = 4e7 * torch.rand(n, dtype=torch.float64, generator=generator)
    floor = 40 * torch.rand(n, dtype=torch.float64, generator=generator)
    weight = torch.rand(n, width, dtype=torch.float64, generator=generator)
    weight[torch.rand(n, width, generator=generator) < 0.3] = 0.0
    return curvature, centre, floor, u, weight


def eager_sums(curvature, centre, floor, u, weight):
    context = _Context()
    PairChannelSum.eager(context, curvature, centre, floor, u, weight, True)
    _, total, first, second = context.saved_tensors
    return total, first, second


@pytest.mark.parametrize("width", [62, 5, 3, 1])
def test_compiled_sums_equal_eager(compiled, width):
    """Per pair the total and both moments agree with eager torch's to rounding, with rows of four
    channels and more (the vector lanes) and fewer (the one-lane tail only)."""
    inputs = rows(3000, width)
    reference = eager_sums(*inputs)
    total, first, second = compiled.pair_channel_sum(*inputs, ARG_CUTOFF, True)
    du = inputs[3] - inputs[1][:, None]
    arg = du * du * inputs[0][:, None] + inputs[2][:, None]
    live = (arg < ARG_CUTOFF) & (inputs[4] > 0)
    assert 0 < int(live.sum()) < live.numel()  # live, dead and padded terms all present
    assert int((reference[0] > 0).sum()) > 100
    # The scale of each sum: that of its terms' absolute values (the first moment cancels).
    magnitude = torch.exp(-2 * arg.clamp(max=ARG_CUTOFF)) * inputs[4] * live
    for mine, theirs, power in zip((total, first, second), reference, range(3)):
        scale = (magnitude * du.abs() ** power).sum(dim=1)
        # Measured: 3e-15 of the scale (FMA and the polynomial's few ulp against Sleef's exp).
        assert torch.all((mine - theirs).abs() <= 1e-13 * scale)
    without_moments = compiled.pair_channel_sum(*inputs, ARG_CUTOFF, False)
    assert torch.equal(without_moments[0], total) and without_moments[1].numel() == 0


def test_compiled_sums_carry_nan_and_drop_infinite_args(compiled):
    """A NaN arg anywhere in a row makes that pair's three sums NaN (the refinement's non-finite
    check sees it), as eager torch does; an infinite arg is beyond the cut-off and adds nothing."""
    curvature, centre, floor, u, weight = rows(8, 9)
    floor[2] = float("nan")
    u[5, 7] = float("nan")
    weight[6, 3] = 0.0
    u[6, 3] = float("nan")  # NaN even where the weight is 0 (eager: NaN * 0)
    curvature[7] = float("inf")
    total, first, second = compiled.pair_channel_sum(curvature, centre, floor, u, weight, ARG_CUTOFF, True)
    reference = eager_sums(curvature, centre, floor, u, weight)
    for sums in (total, first, second):
        assert torch.isnan(sums[[2, 5, 6]]).all() and not torch.isnan(sums[[0, 1, 3, 4, 7]]).any()
    assert total[7] == 0.0 and reference[0][7] == 0.0
    assert torch.isnan(reference[0][[2, 5, 6]]).all()


def test_compiled_sums_do_not_depend_on_the_thread_count(compiled):
    """Each pair is summed by one thread: 1 and 2 threads give the same bytes."""
    inputs = rows(5000, 40, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compiled.pair_channel_sum(*inputs, ARG_CUTOFF, True)
        torch.set_num_threads(2)
        two = compiled.pair_channel_sum(*inputs, ARG_CUTOFF, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_compiled_loop_checks_its_inputs(compiled):
    curvature, centre, floor, u, weight = rows(4, 6)
    with pytest.raises(RuntimeError, match="u must be a contiguous float64 CPU tensor"):
        compiled.pair_channel_sum(curvature, centre, floor, u.T, weight, ARG_CUTOFF, True)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        compiled.pair_channel_sum(curvature[:3], centre, floor, u, weight, ARG_CUTOFF, True)
    for cutoff in (0.0, 40.5):
        with pytest.raises(RuntimeError, match=r"pair_channel_sum: the cut-off must be in \(0, 40\]"):
            compiled.pair_channel_sum(curvature, centre, floor, u, weight, cutoff, True)


def test_switched_off_the_eager_loop_runs(fresh_state, monkeypatch):
    monkeypatch.setenv(fused.SWITCH, "0")
    assert fused.pair_channel_sum_module() is None
    assert fused.unavailable_reason() == f"{fused.SWITCH}=0"
    curvature, centre, floor, u, weight = rows(50, 12)
    total = PairChannelSum.apply(curvature, centre, floor, u, weight)
    assert torch.equal(total, eager_sums(curvature, centre, floor, u, weight)[0])


def test_a_failed_build_warns_once_and_the_eager_loop_runs(fresh_state, monkeypatch, tmp_path, caplog):
    """A source that does not compile (here: not C++) leaves the module None with one warning naming
    the error, and the forward model still evaluates (eager torch)."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(fused, "SOURCE", broken)
    monkeypatch.setattr(fused, "extension_name", lambda: "xfel_spread_test_broken_build")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv(fused.SWITCH, raising=False)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert fused.pair_channel_sum_module() is None
        assert fused.pair_channel_sum_module() is None
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "eager torch loop runs instead" in warnings[0].getMessage()
    # The compiler's own error line, not torch's "[1/2] c++ ..." command line.
    assert "broken.cpp" in fused.unavailable_reason() and "error:" in fused.unavailable_reason()
    curvature, centre, floor, u, weight = rows(50, 12)
    assert torch.isfinite(PairChannelSum.apply(curvature, centre, floor, u, weight)).all()


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_for(monkeypatch, tmp_path, caplog):
    """torch's builder waits forever for a lock a killed build left. A lock another process still
    holds is waited for until it goes; one older than STALE_LOCK_S (or turning so while waited for)
    is removed, with a warning."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(fused, "LOCK_POLL_S", 0.05)
    lock = tmp_path / "some_extension" / "lock"
    lock.parent.mkdir()
    lock.touch()
    releaser = threading.Timer(0.3, lock.unlink)  # the other process's build ends
    releaser.start()
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        fused._wait_for_build_lock("some_extension")
        releaser.join()
        assert not caplog.records and not lock.exists()
        lock.touch()
        monkeypatch.setattr(fused, "STALE_LOCK_S", 0.3)  # this lock's holder was killed
        started = time.perf_counter()
        fused._wait_for_build_lock("some_extension")
        assert time.perf_counter() - started >= 0.2
    assert not lock.exists()
    assert len(caplog.records) == 1 and "stale build lock" in caplog.records[0].getMessage()


def test_compiled_quadratic_sums_and_gradients_equal_autograd(compiled):
    """PairQuadraticSum (the pairs' quadratic, its channel sums over their ragged rows and their
    derivatives, in one compiled call) against arg_quadratic and the eager PairChannelSum over the
    padded rows under autograd: sums and the gradients in h and N agree to rounding. The rows are of
    every length from 0 to the band's, at its start, middle and end."""
    from xfel_spread.sim.forward import LiveTerms, PairQuadraticSum, arg_quadratic

    generator = torch.Generator().manual_seed(5)
    n, n_band, n_indices = 4000, 100, 30
    hkl = torch.randint(-20, 21, (n, 3), generator=generator).to(torch.float64)
    centre = 0.1405 + 5e-4 * torch.rand(n, 1, dtype=torch.float64, generator=generator)
    h = hkl / centre + 0.02 * torch.randn(n, 3, dtype=torch.float64, generator=generator) / centre
    ncells = torch.tensor([57.0, 50.0, 63.0], dtype=torch.float64)
    band = torch.linspace(0.139, 0.142, n_band, dtype=torch.float64)
    n_channels = torch.randint(0, n_band + 1, (n,), generator=generator)
    k_first = (torch.rand(n, dtype=torch.float64, generator=generator) * (n_band - n_channels + 1)).long()
    table = torch.rand(n_indices, n_band, dtype=torch.float64, generator=generator)
    table[0] = 0.0  # the row of indices outside the amplitude table
    live = LiveTerms(torch.arange(n), hkl, k_first, n_channels,
                     torch.randint(0, n_indices, (n,), generator=generator), table, band)
    combine = torch.rand(n, dtype=torch.float64, generator=generator)

    def sums_and_gradients(evaluate):
        leaves = (h.clone().requires_grad_(True), ncells.clone().requires_grad_(True))
        total = evaluate(*leaves)
        return (total.detach(), *torch.autograd.grad((combine * total).sum(), leaves))

    class Eager(PairChannelSum):
        forward = staticmethod(lambda ctx, *a: PairChannelSum.eager(ctx, *a, any(ctx.needs_input_grad[:3])))

    mine = sums_and_gradients(lambda hh, nn: PairQuadraticSum.apply(hh, nn, live))
    theirs = sums_and_gradients(lambda hh, nn: Eager.apply(*arg_quadratic(hh, hkl, nn), *live.padded()))
    assert int((theirs[0] > 1e-6 * theirs[0].max()).sum()) > 500  # live pairs, not an empty comparison
    assert int((n_channels == 0).sum()) > 0 and int((k_first + n_channels == n_band).sum()) > 0
    for a, b in zip(mine, theirs):
        # Measured: sums and h-gradients to 2e-16 of their largest, the N-gradient (a sum over the
        # pairs) to 2e-14.
        assert torch.all((a - b).abs() <= 1e-12 * b.abs().max()), float((a - b).abs().max() / b.abs().max())


def test_compiled_quadratic_sums_check_the_rows(compiled):
    """A pair whose channels run past the band, or whose table row does not exist, is an error, not a
    read outside the arrays."""
    from xfel_spread.sim.forward import GAUSS_WIDTH

    h, hkl, ncells = torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), torch.ones(
        3, dtype=torch.float64)
    band, table = torch.linspace(0.1, 0.2, 10, dtype=torch.float64), torch.ones(3, 10, dtype=torch.float64)

    def call(row, k_first, n_channels):
        return compiled.pair_quadratic_sum(h, hkl, ncells, band, table, torch.tensor(row), torch.tensor(k_first),
                                           torch.tensor(n_channels), GAUSS_WIDTH, ARG_CUTOFF, True)

    assert torch.isfinite(call([0, 2], [0, 5], [10, 5])[0]).all()
    for row, k_first, n_channels in (([0, 3], [0, 0], [1, 1]), ([0, 0], [6, 0], [5, 1]), ([0, 0], [-1, 0], [2, 1])):
        with pytest.raises(RuntimeError, match="outside the band or the table"):
            call(row, k_first, n_channels)
    with pytest.raises(RuntimeError, match=r"pair_quadratic_sum: the cut-off must be in \(0, 40\]"):
        compiled.pair_quadratic_sum(h, hkl, ncells, band, table, torch.tensor([0, 2]), torch.tensor([0, 5]),
                                    torch.tensor([10, 5]), GAUSS_WIDTH, 41.0, True)


def test_compiled_channel_runs_equal_torch_to_the_bit(compiled):
    """channel_runs (the analytic eta's runs of channels with the same nearest Miller index) in the compiled
    loop against eager torch's: the same runs, indices and channels to the bit, also where u h lands on a
    half-integer (the rounding's ties, torch's product then the half subtracted, no fused multiply-add)
    and on rows holding a NaN (a run at every channel)."""
    from xfel_spread.sim.forward import channel_runs, channel_runs_eager

    generator = torch.Generator().manual_seed(3)
    u = torch.linspace(0.5630, 0.5700, 100, dtype=torch.float64)
    h = 40 * torch.randn(3000, 3, dtype=torch.float64, generator=generator)
    # Rows whose u h is a half-integer at channel 37, to rounding: ties of ceil(x - 0.5) in every axis.
    h[:200] = (torch.randint(-30, 30, (200, 3), generator=generator).to(torch.float64) + 0.5) / u[37]
    h[200:210, 1] = float("nan")
    ties = u[37] * h[:200] - 0.5
    assert int((ties == torch.round(ties)).sum()) > 100  # exact ties reached, not only near ones
    mine, theirs = channel_runs(h, u), channel_runs_eager(h, u)
    assert mine[0].numel() > 5000 and int((mine[0] == 205).sum()) == 100
    for a, b in zip(mine, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5))


def test_ragged_channel_sums_equal_the_padded_rows_with_gradients(compiled):
    """pair_channel_sums over ragged rows (the analytic eta's, read in place by the compiled loop) against
    the eager PairChannelSum over the same rows padded: the sums and the gradients in curvature, centre
    and floor to rounding, for rows of every length from 0 to the band's."""
    from xfel_spread.sim.forward import LiveTerms, RaggedPairChannelSum, pair_channel_sums

    generator = torch.Generator().manual_seed(7)
    n, n_band, n_indices = 3000, 100, 20
    band = torch.linspace(0.139, 0.142, n_band, dtype=torch.float64)
    n_channels = torch.randint(0, n_band + 1, (n,), generator=generator)
    k_first = (torch.rand(n, dtype=torch.float64, generator=generator) * (n_band - n_channels + 1)).long()
    table = torch.rand(n_indices, n_band, dtype=torch.float64, generator=generator)
    live = LiveTerms(torch.arange(n), torch.zeros(n, 3, dtype=torch.float64), k_first, n_channels,
                     torch.randint(0, n_indices, (n,), generator=generator), table, band)
    middle = band[torch.clamp(k_first + n_channels // 2, max=n_band - 1)]
    inputs = (4e7 * torch.rand(n, dtype=torch.float64, generator=generator),
              middle + 1e-5 * torch.randn(n, dtype=torch.float64, generator=generator),
              20 * torch.rand(n, dtype=torch.float64, generator=generator))
    combine = torch.rand(n, dtype=torch.float64, generator=generator)

    class Eager(PairChannelSum):
        forward = staticmethod(lambda ctx, *a: PairChannelSum.eager(ctx, *a, any(ctx.needs_input_grad[:3])))

    def sums_and_gradients(evaluate):
        leaves = tuple(x.clone().requires_grad_(True) for x in inputs)
        total = evaluate(*leaves)
        return (total.detach(), *torch.autograd.grad((combine * total).sum(), leaves))

    calls = []
    original = RaggedPairChannelSum.forward

    def counted(ctx, *args):
        calls.append(1)
        return original(ctx, *args)

    RaggedPairChannelSum.forward = staticmethod(counted)
    try:
        mine = sums_and_gradients(lambda *x: pair_channel_sums(*x, live))
    finally:
        RaggedPairChannelSum.forward = staticmethod(original)
    theirs = sums_and_gradients(lambda *x: Eager.apply(*x, *live.padded()))
    assert calls == [1]  # the ragged rows ran, not the padded fallback
    assert int((theirs[0] > 1e-6 * theirs[0].max()).sum()) > 500 and int((n_channels == 0).sum()) > 0
    for a, b in zip(mine, theirs):
        # Measured: the sums and the three gradients to 2e-16-5e-16 of their largest.
        assert torch.all((a - b).abs() <= 1e-12 * b.abs().max()), float((a - b).abs().max() / b.abs().max())
