"""K-FAC and EKFAC against independently computed Kronecker factors and the exact Fisher.

The reference walks an ``nn.Sequential`` by hand: layer inputs (patches cut out by slicing for a
convolution) give ``A``; per-sample Jacobians of the output w.r.t. each layer's output, with the
hand-written output Fisher, give ``G = (1/N) Σ_i Σ_r J_irᵀ F_out J_ir``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    dense_fisher,
    make_case,
    output_fisher,
    torch_log_prob,
    torch_sample,
)
from torch import Tensor, nn

from npg import make_fisher
from npg.families import Bernoulli, Categorical, Family, GaussianRegression
from npg.fisher import KFACFisher
from npg.fisher._per_sample import output_scores, sampled_labels
from npg.fisher.kfac import ClosureFactors, KroneckerBlock

pytestmark = pytest.mark.usefixtures("float64")

LAYERS = (nn.Linear, nn.Conv2d)


def _patches(conv: nn.Conv2d, h: Tensor) -> Tensor:
    """``(N, R, C_in·kh·kw)`` input patches of a convolution, cut out by slicing."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    hp = F.pad(h, (pw, pw, ph, ph))
    out_h = (hp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (hp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(out_h):
        for j in range(out_w):
            win = hp[
                :,
                :,
                i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                j * sw : j * sw + dw * (kw - 1) + 1 : dw,
            ]
            rows.append(win.reshape(h.shape[0], -1))
    return torch.stack(rows, 1)


def _score_weights(
    family: Family, out: Tensor, ys: list[Tensor], fisher_fn: Callable | None = None
) -> list[list[Tensor]]:
    """Per sample, the list of output-space matrices ``W`` with ``G_i = Σ J_rᵀ W J_r``."""
    if not ys:
        fisher_fn = fisher_fn or (lambda o: output_fisher(family, o))
        return [[fisher_fn(o)] for o in out]
    res = []
    for i in range(out.shape[0]):
        mats = []
        for y in ys:
            z = out[i : i + 1].clone().requires_grad_(True)
            (s,) = torch.autograd.grad(torch_log_prob(family, z, y[i : i + 1]).sum(), z)
            mats.append(torch.outer(s[0], s[0]) / len(ys))
        res.append(mats)
    return res


def kfac_reference(
    seq: nn.Sequential,
    x: Tensor,
    family: Family | None,
    ys: list[Tensor] | None = None,
    fisher_fn: Callable | None = None,
) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """``(layer, A, G)`` per Linear/Conv2d layer of ``seq``; ``ys`` = label draws (MC or
    empirical) or ``None`` for the exact (type-2) factors, with the hand-written output Fisher
    of ``family`` or ``fisher_fn(out_row)``."""
    mods = list(seq)
    with torch.no_grad():
        out = seq(x)
    weights = _score_weights(family, out, ys or [], fisher_fn)
    n, h, res = x.shape[0], x, []
    for k, m in enumerate(mods):
        if isinstance(m, LAYERS):
            a = _patches(m, h) if isinstance(m, nn.Conv2d) else h[:, None, :]
            if m.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1)], -1)
            A = torch.einsum("nri,nrj->ij", a, a) / (n * a.shape[1])
            rest = nn.Sequential(*mods[k + 1 :])
            z = m(h).detach()
            G = 0.0
            for i in range(n):
                jac = torch.autograd.functional.jacobian(
                    lambda zi, rest=rest: rest(zi[None])[0], z[i]
                )
                jac = (
                    jac.reshape(jac.shape[0], jac.shape[1], -1) if jac.ndim > 2 else jac[..., None]
                )
                for r in range(jac.shape[2]):
                    for w in weights[i]:
                        G = G + jac[:, :, r].T @ w @ jac[:, :, r]
            res.append((m, A, G / n))
        h = m(h)
    return res


def _layer_index(model: nn.Module, layer: nn.Module) -> Tensor:
    """Flat-vector indices of ``[W | b]`` in row-major order (the Kronecker ordering)."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[id(p)] = start
        start += p.numel()
    w0 = offsets[id(layer.weight)]
    d_out = layer.weight.shape[0]
    d_in = layer.weight[0].numel()
    idx = []
    for o in range(d_out):
        idx.extend(range(w0 + o * d_in, w0 + (o + 1) * d_in))
        if layer.bias is not None:
            idx.append(offsets[id(layer.bias)] + o)
    return torch.tensor(idx)


def kfac_dense_reference(model: nn.Module, factors) -> Tensor:
    dim = sum(p.numel() for p in model.parameters())
    dense = torch.zeros(dim, dim)
    for layer, A, G in factors:
        idx = _layer_index(model, layer)
        dense[idx[:, None], idx[None, :]] = torch.kron(G, A)
    return dense


def _seq(model: nn.Module) -> nn.Sequential:
    return model if isinstance(model, nn.Sequential) else nn.Sequential(model)


KFAC_CASES = [
    (arch, fid)
    for arch in ("linear", "mlp_tanh", "mlp_relu", "conv")
    for fid in ("categorical", "bernoulli", "gauss_out_std", "regression", "multi")
]


@pytest.mark.parametrize(("arch", "fid"), KFAC_CASES)
def test_kfac_type2_equals_kronecker_formula(arch: str, fid: str) -> None:
    model, x, family = make_case(arch, fid, n=4)
    ref = kfac_reference(_seq(model), x, family)
    op = make_fisher("kfac", model, x, family)
    got = op.kronecker_factors()
    assert [m for m, _, _ in got] == [m for m, _, _ in ref]
    for (_, A, G), (_, A_ref, G_ref) in zip(got, ref, strict=True):
        assert_close(A, A_ref)
        assert_close(G, G_ref)
    dense = kfac_dense_reference(model, ref)
    assert_close(op.to_dense(), dense)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    assert_close(op.mv(v), dense @ v)
    assert_close(op.diagonal(), torch.diagonal(dense))


@pytest.mark.parametrize("labels", ["mc", "empirical"])
@pytest.mark.parametrize("arch", ["mlp_tanh", "conv"])
def test_kfac_sampled_and_empirical_labels(arch: str, labels: str) -> None:
    model, x, family = make_case(arch, "categorical", n=4)
    if labels == "mc":
        gen = torch.Generator().manual_seed(5)
        ys = list(sampled_labels(family, model(x), 3, gen).split(x.shape[0]))
        op = make_fisher("kfac", model, x, family, kfac_labels="mc", n_samples=3, seed=5)
    else:
        ys = [torch_sample(family, model(x), seed=2)]
        op = make_fisher("kfac", model, x, family, kfac_labels="empirical", targets=ys[0])
    ref = kfac_reference(_seq(model), x, family, ys)
    assert_close(op.to_dense(), kfac_dense_reference(model, ref))


def test_kfac_is_exact_for_a_linear_layer_with_gaussian_regression() -> None:
    """``F = (1/N) Σ (I/σ²) ⊗ a aᵀ = (I/σ²) ⊗ A``: K-FAC and EKFAC are the exact Fisher."""
    torch.manual_seed(0)
    model, family = nn.Linear(4, 3), GaussianRegression(0.8)
    x = torch.randn(7, 4)
    exact = dense_fisher(model, x, family)
    for name in ("kfac", "ekfac"):
        assert_close(make_fisher(name, model, x, family).to_dense(), exact)
    _, _, G = KFACFisher(model, x, family).kronecker_factors()[0]
    assert_close(G, torch.eye(3) / 0.8**2)


@pytest.mark.parametrize("fid", ["categorical", "gauss_out_std", "bernoulli"])
def test_kfac_one_datum_equals_exact_diagonal_blocks(fid: str) -> None:
    """With one datum and type-2 labels each layer's Fisher block is ``G ⊗ A`` exactly (not the
    cross-layer blocks): K-FAC = the block-diagonal of the exact Fisher."""
    model, x, family = make_case("mlp_tanh", fid, n=1)
    exact = dense_fisher(model, x, family)
    kfac = make_fisher("kfac", model, x, family).to_dense()
    mask = torch.zeros_like(exact, dtype=torch.bool)
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        idx = _layer_index(model, layer)
        mask[idx[:, None], idx[None, :]] = True
    assert_close(kfac[mask], exact[mask])
    assert bool((kfac[~mask] == 0).all())
    assert (exact[~mask].abs().max()) > 1e-3  # the approximation does drop something


@pytest.mark.parametrize("arch", ["mlp_relu", "conv"])
def test_ekfac_is_the_exact_diagonal_in_the_kronecker_eigenbasis(arch: str) -> None:
    """EKFAC keeps K-FAC's eigenbasis ``Q = Q_G ⊗ Q_A`` and takes ``diag(Qᵀ F_block Q)`` of the
    exact Fisher block (George et al. 2018), hence the Frobenius-best matrix in that basis."""
    model, x, family = make_case(arch, "categorical", n=4)
    exact = dense_fisher(model, x, family)
    kfac = make_fisher("kfac", model, x, family)
    ekfac = make_fisher("ekfac", model, x, family)
    kd, ed = kfac.to_dense(), ekfac.to_dense()
    for layer, A, G in kfac.kronecker_factors():
        idx = _layer_index(model, layer)
        block = exact[idx][:, idx]
        q = torch.kron(torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1])
        scale = torch.diagonal(q.T @ block @ q)
        e_block = ed[idx][:, idx]
        assert_close(e_block, q @ torch.diag(scale) @ q.T, rtol=1e-6, atol=1e-9)
        err_e = torch.linalg.norm(e_block - block)
        err_k = torch.linalg.norm(kd[idx][:, idx] - block)
        assert err_e <= err_k + 1e-12
    # the trace of each block is preserved by EKFAC (it is the exact diagonal in an orthonormal
    # basis), not in general by K-FAC
    assert_close(torch.trace(ed), torch.trace(exact))


@pytest.mark.parametrize("inverse", ["pi", "eigen"])
def test_kfac_inverse(inverse: str) -> None:
    model, x, family = make_case("conv", "categorical", n=4)
    op = make_fisher("kfac", model, x, family, kfac_inverse=inverse)
    g = torch.randn(op.dim, generator=torch.Generator().manual_seed(3))
    lam = 0.05
    if inverse == "eigen":
        expected = torch.linalg.solve(op.to_dense() + lam * torch.eye(op.dim), g)
    else:
        expected = torch.zeros(op.dim)
        for layer, A, G in op.kronecker_factors():
            idx = _layer_index(model, layer)
            pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
            gamma = math.sqrt(lam)
            inv = torch.kron(
                torch.linalg.inv(G + gamma / pi * torch.eye(G.shape[0])),
                torch.linalg.inv(A + pi * gamma * torch.eye(A.shape[0])),
            )
            expected[idx] = inv @ g[idx]
    assert_close(op.inverse_mv(g, lam), expected)
    assert_close(op.solve(g, lam), expected)
    ek = make_fisher("ekfac", model, x, family)
    assert_close(
        ek.inverse_mv(g, lam), torch.linalg.solve(ek.to_dense() + lam * torch.eye(op.dim), g)
    )


def test_kfac_free_log_std_gets_the_exact_diagonal_and_subsets_work() -> None:
    model, x, family = make_case("mlp_tanh", "gauss_free_std", n=4)
    exact = dense_fisher(model, x, family)
    op = make_fisher("kfac", model, x, family)
    dense = op.to_dense()
    assert list(dict(model.named_parameters()))[0] == "log_std"  # own parameters come first
    ls, body = torch.arange(2), torch.arange(2, op.dim)
    assert_close(dense[ls][:, ls], torch.diag(torch.diagonal(exact)[ls]))
    assert bool((dense[ls][:, body] == 0).all())
    # the mean network's blocks: the Kronecker formula of the body (log_std does not feed it)
    mean_fisher = torch.diag(torch.exp(-2 * model.log_std.detach()))
    body_ref = kfac_reference(model.body, x, None, fisher_fn=lambda o: mean_fisher)
    assert_close(dense[2:, 2:], kfac_dense_reference(model.body, body_ref))
    # parameter subset: the last layer only
    sub = make_fisher("kfac", model, x, family, params=["body.4.weight", "body.4.bias"])
    idx = _layer_index(model, model.body[4])
    assert_close(sub.to_dense(), dense[idx.sort().values][:, idx.sort().values])
    # weight without its bias: both fall back to the exact diagonal
    sub = make_fisher("kfac", model, x, family, params=["body.2.weight"])
    assert sub.kronecker_factors() == []
    w = torch.arange(2 + 16, 2 + 16 + 12)  # log_std (2), body.0 (12 + 4), body.2.weight (12)
    assert_close(sub.to_dense(), torch.diag(torch.diagonal(exact)[w]))


def test_kfac_rejects_function_models_and_bad_options() -> None:
    model, x, family = make_case("linear", "categorical")
    with pytest.raises(TypeError):
        KFACFisher(lambda p, x: x, x, family)
    with pytest.raises(ValueError):
        KFACFisher(model, x, family, labels="nope")
    with pytest.raises(ValueError):
        KFACFisher(model, x, family, inverse="nope")
    with pytest.raises(ValueError):
        KFACFisher(model, x, family, labels="empirical")
    with pytest.raises(ValueError):
        KFACFisher(model, x, family).inverse_mv(torch.zeros(15), -1.0)


def test_kfac_bias_free_layers_and_layers_called_twice() -> None:
    """A bias-free layer's block is ``G ⊗ A`` without the ones column; a layer called twice in
    one forward (weight sharing across calls) and one never called get no Kronecker block but
    the exact diagonal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3))
    x, family = torch.randn(5, 3), Categorical()
    op = make_fisher("kfac", model, x, family)
    assert_close(op.to_dense(), kfac_dense_reference(model, kfac_reference(model, x, family)))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head, self.unused = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Twice()
    op = make_fisher("kfac", model, x, family)
    assert [m for m, _, _ in op.kronecker_factors()] == [model.head]
    exact = dense_fisher(model, x, family)
    dense = op.to_dense()
    shared = torch.arange(12)  # shared.weight, shared.bias come first
    assert_close(dense[shared][:, shared], torch.diag(torch.diagonal(exact)[shared]))
    unused = torch.arange(24, 30)
    assert bool((dense[unused] == 0).all())


@pytest.mark.parametrize("inverse", ["pi", "eigen", "ekfac"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 7)])
def test_apply_inverse_with_form_equals_the_block_products(inverse: str, shape) -> None:
    """``apply_inverse_with_form`` gives the step of ``apply_inverse`` and, without products by
    the factors, ``[⟨X, M⟩, ⟨X, G X A⟩]`` of the block it inverted (both orders of ``Ĝ⁻¹MÂ⁻¹``:
    ``dG ≥ dA`` and ``dG < dA``; EKFAC's eigenvalues in the eigen form)."""
    gen = torch.Generator().manual_seed(4)
    dg, da = shape
    a, g = torch.randn(2 * da, da, generator=gen), torch.randn(dg, dg, generator=gen)
    block = KroneckerBlock(nn.Linear(1, 1), slice(0, 0), None, a.T @ a / da, g @ g.T / dg)
    if inverse == "ekfac":
        block.ekfac_scale = torch.rand(dg, da, generator=gen) + 0.1
    inv = block.damped_inverse(0.3, "pi" if inverse == "pi" else "eigen")
    m = torch.randn(dg, da, generator=gen)
    x, sums = inv.apply_with_form(m)
    assert_close(x, inv.apply(m))
    assert_close(sums[0], torch.sum(m * x))
    assert_close(sums[1], torch.sum(x * block.mv(x)))
    if inverse != "ekfac":  # the dense Kronecker form, independently of block.mv
        assert_close(sums[1], x.reshape(-1) @ torch.kron(block.G, block.A) @ x.reshape(-1))


def test_kronecker_eigenbasis_follows_factor_updates() -> None:
    """The cached eigendecomposition is refreshed when a factor is replaced or edited in place
    (running averages and all-reduces do both)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    block = make_fisher("kfac", net, x, Categorical()).blocks[0]

    def eig_matches() -> bool:
        la, qa, lg, qg = block.eig()
        return torch.allclose(qa @ torch.diag(la) @ qa.T, block.A, atol=1e-10) and torch.allclose(
            qg @ torch.diag(lg) @ qg.T, block.G, atol=1e-10
        )

    assert eig_matches()
    block.A = 0.5 * block.A + torch.eye(block.A.shape[0], dtype=torch.float64)  # replaced
    assert eig_matches()
    block.G.mul_(3.0).add_(torch.eye(block.G.shape[0], dtype=torch.float64))  # in place
    assert eig_matches()


@pytest.mark.parametrize("fid", ["categorical", "bernoulli", "regression", "gauss_out_std"])
def test_output_scores_closed_forms_equal_autograd(fid: str) -> None:
    """The closed-form scores (Categorical, Bernoulli, GaussianRegression; autograd otherwise)
    against autograd through ``torch.distributions``' log-density."""
    model, x, family = make_case("mlp_tanh", fid, n=6)
    out = model(x).detach()
    y = torch_sample(family, out, seed=4)
    leaf = out.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(torch_log_prob(family, leaf, y).sum(), leaf)
    assert_close(output_scores(family, out, y), expected)
    assert type(family) in (Categorical, Bernoulli, GaussianRegression) or fid == "gauss_out_std"


@pytest.mark.parametrize("labels", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("arch", ["mlp_tanh", "conv"])
def test_closure_factors_equal_kfac_fisher(arch: str, labels: str) -> None:
    """Factors captured from a closure's forward pass (and its graph, still good for the
    closure's own backward) equal :class:`KFACFisher`'s on the same batch."""
    model, x, family = make_case(arch, "categorical", n=4)
    y = torch_sample(family, model(x), seed=2)
    op = make_fisher("kfac", model, x, family, kfac_labels=labels, targets=y, n_samples=2, seed=7)
    layers = [(m, m.bias is not None) for m, _, _ in op.kronecker_factors()]
    model.zero_grad()
    reference_grads = torch.autograd.grad(F.cross_entropy(model(x), y), model.parameters())
    with ClosureFactors(model, layers, x, family, labels, y, 2, 7) as capture:
        F.cross_entropy(model(x), y).backward()
    assert capture.factors is not None
    for (A, G), (_, A_ref, G_ref) in zip(capture.factors, op.kronecker_factors(), strict=True):
        assert_close(A, A_ref)
        assert_close(G, G_ref)
    for p, g in zip(model.parameters(), reference_grads, strict=True):
        assert_close(p.grad, g)
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed


def test_closure_factors_fall_back_on_other_inputs_or_repeated_layers() -> None:
    model, x, family = make_case("mlp_tanh", "categorical", n=4)
    layers = [(m, True) for m in model.modules() if isinstance(m, nn.Linear)]
    with ClosureFactors(model, layers, x, family, "exact", None, 1, 0) as capture:
        model(x.clone())  # not the batch the optimizer was given
    assert capture.factors is None
    with ClosureFactors(model, layers, x, family, "exact", None, 1, 0) as capture:
        model(x)
        model(x)  # later calls are ignored: the first one gave the factors
    assert capture.factors is not None
    block = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    twice = nn.Sequential(block, block)  # one layer called twice in one forward
    with ClosureFactors(twice, [(block[0], True)], x, family, "exact", None, 1, 0) as capture:
        twice(x)
    assert capture.factors is None


def test_inversion_errors_say_what_went_wrong() -> None:
    from npg.fisher.kfac import KroneckerBlock

    layer = nn.Linear(3, 2)

    def block(a: Tensor, g: Tensor) -> KroneckerBlock:
        return KroneckerBlock(layer, slice(0, 6), slice(6, 8), a, g)

    singular = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="singular; pass damping > 0"):
        block(singular, torch.eye(2)).damped_inverse(0.0, "pi")
    with pytest.raises(ValueError, match="singular; pass damping > 0"):
        block(singular, torch.eye(2)).damped_inverse(0.0, "eigen")
    overflowed = torch.full((4, 4), math.inf)
    with pytest.raises(ValueError, match="Linear layer hold NaN/inf.*diverging.*max_kl"):
        block(overflowed, torch.eye(2)).damped_inverse(1e-3, "pi")
