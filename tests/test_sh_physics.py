"""Tests of the ``sh`` relighter that a physicist would accept."""

from __future__ import annotations

import math

import pytest
import torch

from relit_k8s.relighters import create
from relit_k8s.relighters.harmonics import (
    env_directions,
    irradiance,
    project_env,
    sh_basis,
    srgb_to_linear,
)


def sphere_normals(size: int = 65):
    """Normal map of a sphere facing the camera; background pixels face the camera too."""
    c = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(-c, c, indexing="ij")  # +y up
    r2 = x**2 + y**2
    inside = r2 < 0.95
    z = torch.sqrt((1 - r2).clamp_min(0))
    n = torch.stack([x, y, z])
    n = torch.where(inside, n, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1))
    return n / n.norm(dim=0, keepdim=True), inside, x


def env_with_sun(u: float, h: int = 64, w: int = 128, power: float = 500.0, mirror=False):
    """A dim environment with a 2x2-pixel sun on the horizon at column u (or its mirror)."""
    env = torch.full((3, h, w), 0.05)
    col = int(round(u * w))
    cols = slice(w - col - 1, w - col + 1) if mirror else slice(col - 1, col + 1)
    env[:, h // 2 - 1:h // 2 + 1, cols] = power
    return env


def test_solid_angles_cover_the_sphere():
    _, solid = env_directions(64, 128)
    assert solid.sum().item() == pytest.approx(4 * math.pi, rel=1e-3)


def test_directions_follow_the_documented_convention():
    d, _ = env_directions(2, 4)  # u centres 0.125, 0.375, 0.625, 0.875 on the horizon-ish rows
    d, _ = env_directions(1, 4)  # one row: theta = pi/2, the horizon
    assert d[0, 1].tolist() == pytest.approx([-math.sin(math.pi / 4), 0, -math.cos(math.pi / 4)])
    # u = 0.5 looks where the camera looks (-z); u = 0.25 is the camera's left (-x)
    d, _ = env_directions(1, 2)
    assert d[0, 0, 0] < 0 and d[0, 1, 0] > 0


def test_sh_basis_is_orthonormal_on_the_sphere():
    d, solid = env_directions(256, 512)
    y = sh_basis(d)  # h x w x 9
    gram = torch.einsum("hwi,hwj,hw->ij", y, y, solid)
    assert torch.allclose(gram, torch.eye(9, dtype=gram.dtype), atol=2e-3)


def test_projection_of_a_constant_environment_matches_the_closed_form():
    c = 2.5
    coeffs = project_env(torch.full((3, 64, 128), c))[0]
    # L_00 = c * integral of Y_00 = c * sqrt(4 pi); every other coefficient vanishes
    assert coeffs[0].tolist() == pytest.approx([c * math.sqrt(4 * math.pi)] * 3, rel=1e-3)
    assert coeffs[1:].abs().max() < 1e-2 * c
    # and the irradiance of a constant environment is pi * c for every normal
    normals, _, _ = sphere_normals(9)
    e = irradiance(coeffs[None], normals)
    assert torch.allclose(e, torch.full_like(e, math.pi * c), rtol=5e-3)


def test_irradiance_of_a_sun_follows_the_cosine_law():
    env = torch.zeros(3, 128, 256)
    env[:, 63:65, 127:129] = 1000.0  # a small source straight ahead of the camera (-z)
    coeffs = project_env(env)
    front = irradiance(coeffs, torch.tensor([0.0, 0.0, -1.0]).view(3, 1, 1))[0, 0, 0, 0]
    side = irradiance(coeffs, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))[0, 0, 0, 0]
    back = irradiance(coeffs, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1))[0, 0, 0, 0]
    assert front > 3 * side > 0 and abs(back) < 0.1 * front


def test_uniform_white_environment_leaves_the_image_unchanged_up_to_exposure():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 40, 60, generator=g) * 0.8
    r = create("sh", {}, "cpu")
    out = r.relight(image, torch.full((3, 32, 64), 3.0), [1, 2, 3])
    for b in range(3):
        assert (out[b] - image).abs().max() < 2e-3


def test_a_red_environment_makes_the_image_redder():
    image = torch.full((3, 32, 32), 0.5)
    red = torch.zeros(3, 32, 64)
    red[0] = 2.0
    red[1:] = 0.5
    out = create("sh", {}, "cpu").relight(image, red, [7])[0]
    lin = srgb_to_linear(out)
    assert (lin[0] / lin[1]).mean() > 1.5
    assert (lin[0] / lin[2]).mean() > 1.5


def test_moving_the_sun_from_left_to_right_moves_the_brightness_on_a_sphere():
    normals, inside, x = sphere_normals()
    image = torch.full((3, *inside.shape), 0.6)
    r = create("sh", {"rotation": "none"}, "cpu")
    left_lit = r.relight(image, env_with_sun(u=0.25), [0], normals)[0].mean(0)
    right_lit = r.relight(image, env_with_sun(u=0.25, mirror=True), [0], normals)[0].mean(0)
    left, right = inside & (x < -0.3), inside & (x > 0.3)
    assert left_lit[left].mean() > 1.5 * left_lit[right].mean()
    assert right_lit[right].mean() > 1.5 * right_lit[left].mean()
    # a mirrored sun gives the mirrored image
    assert torch.allclose(left_lit, right_lit.flip(-1), atol=1e-3)


def test_a_sun_behind_the_camera_lights_the_face_looking_at_it():
    normals, inside, _ = sphere_normals()
    image = torch.full((3, *inside.shape), 0.6)
    r = create("sh", {"rotation": "none"}, "cpu")
    # u ~ 0: the left edge, behind the camera (+z)
    out = r.relight(image, env_with_sun(u=1 / 128), [0], normals)[0].mean(0)
    centre = inside & (normals[2] > 0.95)
    rim = inside & (normals[2] < 0.3)
    assert out[centre].mean() > out[rim].mean()


def test_seeds_rotate_the_light_and_are_reproducible():
    normals, inside, x = sphere_normals()
    image = torch.full((3, *inside.shape), 0.6)
    r = create("sh", {}, "cpu")
    env = env_with_sun(u=0.25)
    outs = r.relight(image, env, list(range(8)), normals)
    assert torch.equal(outs, r.relight(image, env, list(range(8)), normals))
    balance = [(o.mean(0)[inside & (x < 0)].mean() - o.mean(0)[inside & (x > 0)].mean()).item()
               for o in outs]
    assert min(balance) < -0.05 and max(balance) > 0.05  # lit from different sides


def test_source_fit_divides_out_the_inputs_own_shading():
    normals, inside, x = sphere_normals()
    shading = (0.2 + 0.8 * (-normals[0]).clamp_min(0))  # input lit from the left
    image = (shading * 0.7).expand(3, -1, -1).clamp(0, 1) ** (1 / 2.2)
    white = torch.full((3, 32, 64), 1.0)
    fit = create("sh", {"source": "fit", "rotation": "none"}, "cpu")
    out = fit.relight(image, white, [0], normals)[0].mean(0)
    before = image.mean(0)
    spread = lambda img: img[inside & (x < -0.3)].mean() - img[inside & (x > 0.3)].mean()  # noqa: E731
    assert spread(out) < 0.6 * spread(before)


@pytest.mark.parametrize("shape,k", [((1, 1, 37, 53), 9), ((2, 3, 8, 5), 3), ((1, 1, 4, 4), 7)])
def test_box_blur_is_the_mean_over_the_square_window_with_replicated_edges(shape, k):
    """The separable running-sum blur equals the plain k x k window average it replaced."""
    import torch.nn.functional as F

    from relit_k8s.relighters.harmonics import box_blur

    torch.manual_seed(1)
    x = torch.rand(shape) * 100
    square = F.avg_pool2d(F.pad(x.double(), (k // 2,) * 4, mode="replicate"), k, stride=1)
    got = box_blur(x, k)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got.double(), square, rtol=1e-6, atol=1e-5)


def test_estimated_normals_are_unit_length_and_face_the_camera_at_the_centre():
    from relit_k8s.relighters.harmonics import estimate_normals

    torch.manual_seed(2)
    n = estimate_normals(torch.rand(3, 129, 257), dome=0.6, detail=0.08)
    assert n.shape == (3, 129, 257)
    assert torch.allclose(n.norm(dim=0), torch.ones(129, 257), atol=1e-6)
    flat = estimate_normals(torch.full((3, 129, 257), 0.5), dome=0.6, detail=0.08)
    assert torch.allclose(flat[:, 64, 128], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    assert flat[0, 64, -1] > 0.2 and flat[0, 64, 0] < -0.2  # the dome leans outwards


# --- ringing: a one-sided coloured light ------------------------------------------------------
def red_from_the_right(h: int = 64, w: int = 128) -> torch.Tensor:
    """Red light from the camera's right (u = 0.75 is +x) and a faint neutral ambient."""
    env = torch.full((3, h, w), 0.01)
    env[0, h // 2 - 12:h // 2 + 12, int(0.75 * w) - 6:int(0.75 * w) + 6] = 50.0
    return env


def test_the_windowed_kernel_is_nonnegative_and_the_exact_one_is_not():
    from relit_k8s.relighters.harmonics import NONNEGATIVE_WINDOW

    x = torch.linspace(-1, 1, 20001, dtype=torch.float64)

    def kernel(w1: float, w2: float) -> torch.Tensor:  # irradiance of a unit delta light
        return 0.25 + 0.5 * w1 * x + 5 / 16 * w2 * (3 * x**2 - 1) / 2

    assert kernel(NONNEGATIVE_WINDOW[1], NONNEGATIVE_WINDOW[4]).min() >= 0
    assert kernel(1.0, 1.0).min() < -0.039  # the exact order-2 clamped cosine rings


@pytest.mark.parametrize("window", ["nonnegative", "none"])
def test_a_one_sided_red_light_never_turns_the_image_green(window):
    """Where the map holds only red light and a neutral ambient, red's gain is at least
    green's everywhere: no teal where the red light does not reach (ringing)."""
    normals, inside, _ = sphere_normals()
    image = torch.full((3, 65, 65), 0.5)
    r = create("sh", {"rotation": "none", "window": window}, "cpu")
    out = srgb_to_linear(r.relight(image, red_from_the_right(), [0], normals)[0])
    greener = (out[1] > out[0] * (1 + 1e-4)) & inside
    if window == "none":
        assert greener.float().mean() > 0.05  # the old kernel paints the shadow side teal
    else:
        assert not greener.any()


def test_windowed_irradiance_ranks_normals_as_the_exact_integral_does():
    """Spearman correlation of sh's irradiance (luminance) with the exact integral over the
    map, on 2,000 random normals, for the bundled maps: windowing keeps the ranking."""
    from pathlib import Path

    from relit_k8s import images
    from relit_k8s.relighters.harmonics import NONNEGATIVE_WINDOW

    g = torch.Generator().manual_seed(0)
    n = torch.randn(3, 1, 2000, generator=g, dtype=torch.float64)
    n = n / n.norm(dim=0, keepdim=True)

    def ranks(v: torch.Tensor) -> torch.Tensor:
        return v.argsort().argsort().double()

    refs = Path(__file__).resolve().parents[1] / "examples" / "refs"
    for path in sorted(refs.iterdir()):
        env = torch.from_numpy(images.as_radiance(images.decode(path.read_bytes(), path.name)))
        env = torch.nn.functional.adaptive_avg_pool2d(env.permute(2, 0, 1)[None], (64, 128))[0]
        dirs, solid = env_directions(64, 128)
        lum = (env * torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)).sum(0).double()
        exact = ((lum * solid)[..., None] * (dirs @ n.reshape(3, -1)).clamp_min(0)).sum((0, 1))
        e = irradiance(project_env(env), n.float(), NONNEGATIVE_WINDOW)[0, :, 0]
        mine = (e * torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1)).sum(0).double()
        rho = torch.corrcoef(torch.stack([ranks(mine), ranks(exact)]))[0, 1]
        assert rho > 0.98, (path.name, float(rho))
