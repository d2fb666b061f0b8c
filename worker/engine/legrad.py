"""LeGrad explainability of the last ViT block, for a batch of N embeddings against one image.

For an embedding ``e`` the score is ``s = <normalize(e), z>`` with ``z = normalize(proj(ln_post(mean_i Y_i)))``
(mean over all tokens of the last block's output Y). The map is ``∂s/∂A`` (A: the last block's attention
probabilities ``[H, n, n]``), clamped at 0, averaged over heads and query rows, patch columns only,
reshaped to the grid, bilinearly upsampled by the patch size and min-max normalised.

Two implementations of ``∂s/∂A``:

* :func:`decomposed_relevance` — A does not depend on ``e``, so ``∂s/∂A`` is linear in ``u = normalize(e)``.
  The image's forward pass is frozen into an :class:`ImageState`; the map for N embeddings is then a chain
  of batched vector-Jacobian products through the last block's post-attention part (ln_post, the MLP
  branch, the output projection), with no autograd through the network and no dependence on depth.
* :func:`autograd_relevance` — the original method: the image repeated once per embedding, the whole
  ViT run, and ``torch.autograd.grad(s, A, create_graph=True)`` (second order when optimised). Kept as the
  reference for tests and benchmarks.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from worker.engine import vit
from worker.engine import cpu_gemm
from worker.engine.cpu_gemm import PackedMatrix


@dataclass
class ImageState:
    """What the decomposed path needs from one forward pass of one image at one input size.

    Shapes: n tokens (1 + g²), width d, MLP width m, heads H, head width dh, embedding dim D.
    """

    global_embedding: torch.Tensor  # [D] class token after ln_post and proj (unnormalised)
    z_unit: torch.Tensor  # [D] normalised explainability feature z
    z_norm: torch.Tensor  # [] ||proj(ln_post(mean Y))||
    post_xhat: torch.Tensor  # [d] ln_post's normalised input (mean token)
    post_rstd: torch.Tensor  # [] ln_post's 1/std
    act_r: torch.Tensor  # [n, m] rstd_i * act'(pre_i): the MLP activation's derivative times ln_2's 1/std per token
    act_xhat_r: torch.Tensor  # [n, m] act_r * (c_fc.weight @ (ln_2.weight * xhat_i)) (xhat: ln_2's normalised input)
    xhat_out: torch.Tensor  # [n, d] (ls_1 * xhat_i) @ out_proj.weight / d per token
    values_t: torch.Tensor  # [H, dh, n-1] attention values of the patch tokens (columns of A), transposed
    grid: int  # g, patches per side
    size: int  # input size S

    @property
    def n_tokens(self) -> int:
        return self.act_r.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def _ln_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised input and 1/std of a LayerNorm over the last dim."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (x - mu) * rstd, rstd


def ln_backward(grad_out: torch.Tensor, weight: torch.Tensor | None, xhat: torch.Tensor,
                rstd: torch.Tensor) -> torch.Tensor:
    """Vector-Jacobian product of a LayerNorm at a fixed input (``xhat``, ``rstd``), batched over leading dims."""
    g = grad_out * weight if weight is not None else grad_out
    return rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))


@torch.no_grad()
def build_image_state(visual: torch.nn.Module, pixels: torch.Tensor, pos: torch.Tensor,
                      gemm: str = "onednn") -> ImageState:
    """Run the ViT once on ``pixels`` ``[1, 3, S, S]`` and freeze what the decomposed maps need (``gemm``: the
    trunk's GEMMs, see :func:`worker.engine.vit.trunk_forward`)."""
    view = vit.last_block(visual)
    x = vit.trunk_forward(visual, pixels, pos, gemm)
    attn, values = view.attention(x)
    act = view.after_attention(x, attn, values)
    tokens = act.out
    with torch.enable_grad():  # elementwise activation derivative, whatever the activation is
        pre = act.pre_act[0].detach().requires_grad_(True)
        act_grad, = torch.autograd.grad(view.act(pre).sum(), pre)
    ybar = tokens[0].mean(0)
    post_xhat, post_rstd = _ln_stats(ybar, view.ln_post.eps)
    z_un = view.pooled_feature(tokens[:1])[0]
    ln2_xhat, ln2_rstd = _ln_stats(act.y1[0], view.ln_2.eps)
    d = view.width
    act_r = act_grad.detach() * ln2_rstd
    xhat_fc = (ln2_xhat * view.ln2_gamma()) @ view.c_fc.weight.T
    z_norm = z_un.norm()
    return ImageState(
        global_embedding=vit.global_embedding(visual, tokens)[0],
        z_unit=z_un / z_norm, z_norm=z_norm, post_xhat=post_xhat, post_rstd=post_rstd.squeeze(-1),
        act_r=act_r, act_xhat_r=act_r * xhat_fc,
        xhat_out=(ln2_xhat * view.ls1_gamma()) @ view.out_proj.weight / d,
        values_t=values[0, :, 1:, :].transpose(-1, -2).contiguous(), grid=vit.grid_side(tokens.shape[1]),
        size=pixels.shape[-1],
    )


@dataclass
class BlockConstants:
    """Products of the last block's weights used by every image (computed once per model)."""

    fc_out: torch.Tensor  # [m, d] W_fc·diag(γ₂ ls₁)·W_out − (W_fc γ₂)(ls₁ W_out)ᵀ / d  (ln_2's mean term folded in)
    ls1: torch.Tensor  # [d]
    ls2: torch.Tensor  # [d]
    fc_out_onednn: PackedMatrix  # fc_out for the step's two GEMMs through oneDNN (packed on first CPU use)

    def gemm(self, backend: str) -> PackedMatrix:
        """``fc_out`` for the step's GEMMs under ``backend`` ("onednn": the packed one, "blas": plain matmuls)."""
        return self.fc_out_onednn if backend == "onednn" else PackedMatrix(self.fc_out, backend)


_constants: "weakref.WeakKeyDictionary[torch.nn.Module, BlockConstants]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def block_constants(visual: torch.nn.Module) -> BlockConstants:
    """:class:`BlockConstants` of ``visual``'s last block (cached per module)."""
    consts = _constants.get(visual)
    if consts is None:
        view = vit.last_block(visual)
        w_fc, w_out = view.c_fc.weight, view.out_proj.weight
        gamma2, ls1 = view.ln2_gamma(), view.ls1_gamma()
        fc_out = (w_fc * (gamma2 * ls1)) @ w_out - torch.outer(w_fc @ gamma2, ls1 @ w_out) / view.width
        consts = BlockConstants(fc_out=fc_out, ls1=ls1, ls2=view.ls2_gamma(), fc_out_onednn=PackedMatrix(fc_out))
        _constants[visual] = consts
    return consts


def relevance_from_cotangents(w: torch.Tensor, b: torch.Tensor, state: ImageState, fc_out: torch.Tensor,
                              heads: int) -> torch.Tensor:
    """Patch relevance ``[N, n-1]`` from the per-embedding cotangents of the last block (reference, autograd).

    ``w`` ``[N, m]``: cotangent at the MLP activation's output (shared by all tokens); ``b`` ``[N, d]``: the
    cotangent reaching the attention output through the residual. The map is
    ``rel = Σ_{h,i} relu(G_h Vᵀ_h) / (H n)`` with ``G = (act_r ⊙ w) W − (w·act_xhat_r) ⊗ xhat_out + b``.
    """
    n_masks, n, d = w.shape[0], state.act_r.shape[0], fc_out.shape[1]
    t = state.act_r[None] * w[:, None, :]
    g = t @ fc_out - (w @ state.act_xhat_r.T)[..., None] * state.xhat_out + b[:, None, :]
    g = g.view(n_masks, n, heads, d // heads).transpose(1, 2)
    return (g @ state.values_t[None]).clamp(min=0).sum(dim=(1, 2)) / (heads * n)


def _per_mask_mv(mat: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """``vecs @ mat.T`` ``[N, r]`` for ``mat`` ``[r, c]``, ``vecs`` ``[N, c]``, one matrix-vector product per row,
    so each row's rounding does not depend on how many rows there are (a GEMM's blocking does)."""
    out = torch.empty(vecs.shape[0], mat.shape[0], dtype=vecs.dtype, device=vecs.device)
    for i in range(vecs.shape[0]):
        torch.mv(mat, vecs[i], out=out[i])
    return out


class Workspace:
    """Reusable buffer for the sign pattern ``[N, H, n, n-1]`` that one map evaluation keeps for its backward.

    At 448 px the pattern of 10 masks is ~300 MB; allocating it afresh each step costs page faults on every
    write (large blocks come from mmap and go back on free). The inversion loop holds one workspace for all
    its steps. A buffer is lent to one forward at a time and returned by its backward; a forward that finds it
    lent allocates its own. A second backward of a map whose buffer was handed out again fails on autograd's
    version check of the saved tensor (the later forward wrote it in place), never with another step's pattern.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.lent = False
        self.generation = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
        """A buffer of ``shape`` and this loan's generation (-1: a fresh tensor, not the workspace's)."""
        if self.lent:
            return torch.empty(shape, dtype=dtype, device=device), -1
        buf = self._buffer
        numel = math.prod(shape)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = self._buffer = torch.empty(numel, dtype=dtype, device=device)
        self.lent = True
        self.generation += 1
        return buf[:numel].view(shape), self.generation

    def give_back(self, generation: int) -> None:
        if generation == self.generation:
            self.lent = False


def _unique_rows(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows of ``(w, b)`` without exact repeats, and the index of each original row among them (None: no
    repeats). At the first step every LET is the global embedding: one map serves all masks."""
    if w.shape[0] < 2 or not (torch.equal(w, w[:1].expand_as(w)) and torch.equal(b, b[:1].expand_as(b))):
        return w, b, None
    return w[:1], b[:1], torch.zeros(w.shape[0], dtype=torch.long, device=w.device)


MICRO_BATCH_BYTES = 8 * 2**20  # the sign pattern of one micro-batch of masks stays in a typical L3 cache


def micro_batch(n_tokens: int, heads: int, element_bytes: int) -> int:
    """Masks per micro-batch of the map's loops: as many as keep their ``[H, n, n-1]`` products within
    :data:`MICRO_BATCH_BYTES` (1 at 448 px on ViT-B/16, 5 at 224 px), so the products are clamped, summed and
    turned into sign patterns while still in cache, and the GEMMs get ``k·n`` rows instead of ``n``."""
    return max(1, MICRO_BATCH_BYTES // (element_bytes * heads * n_tokens * (n_tokens - 1)))


def _attention_forward(ctx, g_of, n_u: int, state: ImageState, heads: int, dtype: torch.dtype, acc: torch.dtype,
                       keep_mask: bool, workspace: Workspace | None, device: torch.device,
                       onednn: bool = False) -> torch.Tensor:
    """Relevance ``[n_u, n-1]`` from the per-token cotangents ``g_of(slice) -> [k, n, d]`` of each micro-batch:
    ``Σ_{h,q} relu(G_h Vᵀ_h)``, the products clamped, summed and kept as 0/1 sign patterns while in cache.
    ``onednn``: one oneDNN product ``[k·n, dh] × [dh, n-1]`` per head (:func:`worker.engine.cpu_gemm.linear`) instead
    of torch's batched matmul over heads (:func:`worker.engine.cpu_gemm.heads_use_onednn` decides)."""
    n, d = state.xhat_out.shape
    dh = d // heads
    vt = state.values_t.to(dtype)
    v_rows = vt.transpose(-1, -2).contiguous() if onednn else None  # [H, n-1, dh]: oneDNN's weight layout
    step = min(n_u, micro_batch(n, heads, torch.finfo(dtype).bits // 8))
    shape = (n_u if keep_mask else step, heads, n, n - 1)
    if keep_mask and workspace is not None:
        prod, generation = workspace.take(shape, dtype, device)
    elif keep_mask or not onednn:  # the per-head path needs no buffer when no pattern is kept
        prod, generation = torch.empty(shape, dtype=dtype, device=device), -1
    else:
        prod, generation = None, -1
    rel = torch.empty(n_u, n - 1, dtype=acc, device=device)
    for s0 in range(0, n_u, step):
        k = min(step, n_u - s0)
        sl = slice(s0, s0 + k)
        g = g_of(sl)
        p = None if prod is None else (prod[sl] if keep_mask else prod[:k])
        if v_rows is not None:  # onednn
            gk = g.view(k, n, heads, dh)
            total = torch.zeros(k, n - 1, dtype=acc, device=device)
            for h in range(heads):
                ph = cpu_gemm.linear(gk[:, :, h, :].reshape(k * n, dh), v_rows[h]).view(k, n, n - 1)
                total += ph.clamp_(min=0).sum(dim=1, dtype=acc)
                if p is not None:  # keep_mask
                    torch.sign(ph, out=p[:, h])  # 0/1 (ph >= 0 after the clamp)
            rel[sl] = total
            continue
        assert p is not None  # the batched-matmul path always has its buffer
        torch.matmul(g.view(k, n, heads, dh).transpose(1, 2), vt, out=p)
        rel[sl] = p.clamp_(min=0).sum(dim=(1, 2), dtype=acc)
        if keep_mask:
            p.sign_()  # 0/1 (p >= 0 after the clamp)
    if keep_mask:
        ctx.save_for_backward(prod)
        ctx.state, ctx.heads, ctx.step, ctx.onednn = state, heads, step, onednn
        ctx.workspace, ctx.generation = workspace, generation
    return rel / (heads * n)


def _attention_backward(ctx, grad_rel: torch.Tensor, shared: bool, pull) -> None:
    """Cotangent of the per-token ``G`` ``[k, n, d]`` of each micro-batch, handed to ``pull(slice, gG)``."""
    mask, = ctx.saved_tensors  # [N_unique, H, n, n-1]
    state, heads, step = ctx.state, ctx.heads, ctx.step
    n_masks, (n, d) = grad_rel.shape[0], state.xhat_out.shape
    dh, dtype = d // heads, mask.dtype
    v = state.values_t.transpose(-1, -2).to(dtype)  # [H, n-1, dh]
    col = (grad_rel / (heads * n)).to(dtype)  # [N, n-1]: the cotangent of every column, put on V
    vt = state.values_t.to(dtype) if ctx.onednn else None  # [H, dh, n-1]
    for s0 in range(0, n_masks, step):
        k = min(step, n_masks - s0)
        sl = slice(s0, s0 + k)
        if ctx.onednn:  # per head (and mask) one oneDNN product with the weight (c ⊙ V)ᵀ = Vᵀ diag(c) [., n-1]
            assert vt is not None
            gh = torch.empty(k, n, heads, dh, dtype=dtype, device=grad_rel.device)
            for h in range(heads):
                if shared:  # one pattern: the k masks' weights stacked, [k·dh, n-1]
                    out = cpu_gemm.linear(mask[0, h], (vt[h][None] * col[sl, None, :]).reshape(k * dh, n - 1))
                    gh[:, :, h, :] = out.view(n, k, dh).transpose(0, 1)
                else:
                    for j in range(k):
                        gh[j, :, h, :] = cpu_gemm.linear(mask[s0 + j, h], vt[h] * col[s0 + j])
        elif shared:  # one pattern for all masks: one product with k masks' columns side by side
            rhs = (v[:, :, None, :] * col[sl].T[None, :, :, None]).reshape(heads, n - 1, k * dh)
            gh = (mask[0] @ rhs).view(heads, n, k, dh).permute(2, 1, 0, 3)  # [k, n, H, dh]
        else:
            gh = torch.matmul(mask[sl], v[None] * col[sl, None, :, None]).transpose(1, 2)  # [k, n, H, dh]
        pull(sl, gh.reshape(k, n, d))
    if ctx.workspace is not None:
        ctx.workspace.give_back(ctx.generation)


def _step_dtype(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the large products, dtype of sums and small products >= fp32) for inputs like ``x``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else acc
    return dtype, acc


def _mlp_cotangents(w: torch.Tensor, b: torch.Tensor, c: torch.Tensor, state: ImageState, fc_out: PackedMatrix,
                    dtype: torch.dtype, t: torch.Tensor) -> torch.Tensor:
    """Per-token cotangents ``G = (act_r ⊙ w) W − c ⊗ xhat_out + b`` ``[k, n, d]`` for k rows of ``w`` ``[k, m]``,
    ``b`` ``[k, d]``, ``c`` ``[k, n]`` (``t``: a ``[>=k, n, m]`` buffer); one GEMM ``[k·n, m] × [m, d]``."""
    (n, m), d, k = state.act_r.shape, fc_out.shape[1], w.shape[0]
    tk = torch.mul(state.act_r.to(dtype)[None], w[:, None, :].to(dtype), out=t[:k])
    g = fc_out.mm(tk.view(k * n, m)).view(k, n, d)
    return g.addcmul_(c[:, :, None].to(dtype), state.xhat_out.to(dtype)[None], value=-1).add_(b[:, None, :].to(dtype))


class _Relevance(torch.autograd.Function):
    """:func:`relevance_from_cotangents` with an explicit backward: ``(w [N, m], b [N, d]) -> rel [N, n-1]``.

    ``fc_out``: :attr:`BlockConstants.fc_out` ``[m, d]`` as a tensor (plain matmuls) or a
    :class:`~worker.engine.cpu_gemm.PackedMatrix` (:meth:`BlockConstants.gemm`: oneDNN on the CPU).

    Per micro-batch of k masks, forward: ``t = act_r ⊙ w`` ``[k, n, m]``, one GEMM ``[k·n, m] × [m, d]``, the
    rank-one ln_2 term, and one batched product ``[k, H, n, dh] × [H, dh, n-1]`` that is clamped, summed and
    turned into its 0/1 sign pattern while it is in cache. Backward: ``mask @ (c ⊙ V)`` (inner dimension n-1),
    one GEMM ``[k·n, d] × [d, m]`` reduced against ``act_r`` over tokens, and GEMVs; nothing is recomputed.
    Identical rows (the first step, where every LET is the global embedding) are computed once.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, w: torch.Tensor, b: torch.Tensor, state: ImageState, fc_out: torch.Tensor | PackedMatrix,
                heads: int, keep_mask: bool, workspace: Workspace | None = None) -> torch.Tensor:
        (n, m), in_dtype = state.act_r.shape, w.dtype
        if not isinstance(fc_out, PackedMatrix):
            fc_out = PackedMatrix(fc_out, "blas")
        dtype, acc = _step_dtype(w)
        w, b = w.to(acc), b.to(acc)
        w_u, b_u, inverse = _unique_rows(w, b)
        n_u = w_u.shape[0]
        c = _per_mask_mv(state.act_xhat_r.to(acc), w_u)  # [N, n]
        t = torch.empty(min(n_u, micro_batch(n, heads, torch.finfo(dtype).bits // 8)), n, m, dtype=dtype,
                        device=w.device)
        onednn = cpu_gemm.heads_use_onednn(fc_out.backend, t, n - 1)
        rel = _attention_forward(ctx, lambda sl: _mlp_cotangents(w_u[sl], b_u[sl], c[sl], state, fc_out, dtype, t),
                                 n_u, state, heads, dtype, acc, keep_mask, workspace, w.device, onednn)
        if keep_mask:
            ctx.fc_out, ctx.in_dtype, ctx.shared = fc_out, in_dtype, inverse is not None
        return rel if inverse is None else rel[inverse]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_rel: torch.Tensor):
        state, fc_out = ctx.state, ctx.fc_out
        n_masks, (n, m), d = grad_rel.shape[0], state.act_r.shape, fc_out.shape[1]
        dtype = ctx.saved_tensors[0].dtype
        act_r = state.act_r.to(dtype)
        grad_b = torch.empty(n_masks, d, dtype=grad_rel.dtype, device=grad_rel.device)
        grad_w = torch.empty(n_masks, m, dtype=grad_rel.dtype, device=grad_rel.device)
        grad_c = torch.empty(n_masks, n, dtype=grad_rel.dtype, device=grad_rel.device)

        def pull(sl: slice, gg: torch.Tensor) -> None:
            k = gg.shape[0]
            grad_b[sl] = gg.sum(1)
            grad_c[sl] = -(gg * state.xhat_out).sum(-1)
            tt = fc_out.mm(gg.reshape(k * n, d).to(dtype), transpose=True).view(k, n, m)
            grad_w[sl] = tt.mul_(act_r).sum(1)

        _attention_backward(ctx, grad_rel, ctx.shared, pull)
        grad_w += _per_mask_mv(state.act_xhat_r.T.to(grad_c.dtype), grad_c)
        return grad_w.to(ctx.in_dtype), grad_b.to(ctx.in_dtype), None, None, None, None, None


class _RelevanceFromBasis(torch.autograd.Function):
    """The same relevance from the linear map's basis: ``(u [N, D], basis [D, n, d]) -> rel [N, n-1]``.

    ``G`` is linear in ``u = normalize(LET)``, so with ``basis[j] = G(e_j)`` (:func:`relevance_basis`) the MLP
    side of a mask-step is one GEMM ``[k, D] × [D, n·d]`` forward and one ``[k, n·d] × [n·d, D]`` backward:
    2·D·n·d MAC instead of 2·n·m·d (6× fewer for ViT-B/16), after D·n·m·d once per image and request.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, u: torch.Tensor, basis: torch.Tensor, state: ImageState, heads: int, keep_mask: bool,
                workspace: Workspace | None = None, gemm: str = "onednn") -> torch.Tensor:
        dim, n, d = basis.shape
        dtype, acc = _step_dtype(u)
        in_dtype, u = u.dtype, u.to(acc)
        u_u, _, inverse = _unique_rows(u, u[:, :0])
        # one GEMM for all rows: the basis is read once per call (row by row it would be read per micro-batch)
        g_all = (u_u.to(dtype) @ basis.view(dim, n * d).to(dtype)).view(-1, n, d)
        rel = _attention_forward(ctx, lambda sl: g_all[sl], u_u.shape[0], state, heads, dtype, acc, keep_mask,
                                 workspace, u.device, cpu_gemm.heads_use_onednn(gemm, g_all, n - 1))
        if keep_mask:
            ctx.basis, ctx.in_dtype, ctx.shared = basis, in_dtype, inverse is not None
        return rel if inverse is None else rel[inverse]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_rel: torch.Tensor):
        dim, n, d = ctx.basis.shape
        dtype = ctx.saved_tensors[0].dtype
        grad_g = torch.empty(grad_rel.shape[0], n, d, dtype=dtype, device=grad_rel.device)

        def pull(sl: slice, gg: torch.Tensor) -> None:
            grad_g[sl] = gg

        _attention_backward(ctx, grad_rel, ctx.shared, pull)
        grad_u = grad_g.view(-1, n * d) @ ctx.basis.view(dim, n * d).to(dtype).T  # one GEMM, the basis read once
        return grad_u.to(ctx.in_dtype), None, None, None, None, None, None


def _cotangent_inputs(visual: torch.nn.Module, state: ImageState, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [N, m], b [N, d])``: the cotangents at the MLP activation's output and through the attention residual
    for unit embeddings ``u`` ``[N, D]`` (linear in ``u``)."""
    view = vit.last_block(visual)
    k = block_constants(visual)
    # s = <u, z_un / |z_un|>  ->  ∂s/∂z_un = (u - <u,z> z) / |z_un|
    g_z = (u - (u @ state.z_unit)[:, None] * state.z_unit) / state.z_norm  # [N, D]
    g_pool = g_z @ view.proj.T if view.proj is not None else g_z
    g_ybar = ln_backward(g_pool, view.ln_post.weight, state.post_xhat, state.post_rstd)  # [N, d]
    g_y = g_ybar / state.n_tokens  # the mean spreads the same cotangent over every token
    # MLP branch Y = Y1 + ls2 * c_proj(act(c_fc(ln_2(Y1)))): the cotangent is shared by all tokens,
    # so the c_proj product is done once per embedding, not once per token.
    w = (g_y * k.ls2) @ view.c_proj.weight  # [N, m] at the activation's output
    b = (g_y * k.ls1) @ view.out_proj.weight  # [N, d] through the attention residual
    return w, b


@torch.no_grad()
def relevance_basis(visual: torch.nn.Module, state: ImageState, gemm: str = "onednn") -> torch.Tensor:
    """``basis [D, n, d]``: the per-token cotangents ``G(e_j)`` of the unit vectors (D·n·m·d MAC; 1.2 GB at 448
    px for ViT-B/16). Worth it when a request has many mask-steps (see :func:`basis_pays`). ``gemm``: the
    backend of its GEMMs (:meth:`BlockConstants.gemm`)."""
    dim = state.z_unit.shape[0]
    eye = torch.eye(dim, dtype=state.act_r.dtype, device=state.act_r.device)
    w, b = _cotangent_inputs(visual, state, eye)
    fc_out = block_constants(visual).gemm(gemm)
    (n, m), d = state.act_r.shape, fc_out.shape[1]
    c = w @ state.act_xhat_r.T  # [D, n]
    basis = torch.empty(dim, n, d, dtype=state.act_r.dtype, device=state.act_r.device)
    step = max(1, micro_batch(n, 1, 4))
    t = torch.empty(step, n, m, dtype=state.act_r.dtype, device=state.act_r.device)
    for s0 in range(0, dim, step):
        sl = slice(s0, min(dim, s0 + step))
        basis[sl] = _mlp_cotangents(w[sl], b[sl], c[sl], state, fc_out, state.act_r.dtype, t)
    return basis


def basis_bytes(state: ImageState) -> int:
    """Memory of :func:`relevance_basis` for ``state``."""
    (n, _), d = state.act_r.shape, state.xhat_out.shape[1]
    return state.z_unit.shape[0] * n * d * state.act_r.element_size()


def basis_pays(state: ImageState, mask_steps: int, margin: float = 1.5) -> bool:
    """Whether building the basis once saves MACs over ``mask_steps`` map evaluations with their backward:
    ``mask_steps · 2·n·d·(m − D) > margin · D·n·m·d``."""
    (n, m), d, dim = state.act_r.shape, state.xhat_out.shape[1], state.z_unit.shape[0]
    return m > dim and mask_steps * 2 * n * d * (m - dim) > margin * dim * n * m * d


def decomposed_relevance(visual: torch.nn.Module, state: ImageState, emb: torch.Tensor,
                         workspace: Workspace | None = None, basis: torch.Tensor | None = None,
                         gemm: str = "onednn") -> torch.Tensor:
    """Patch relevance ``[N, n-1]`` (clamped ∂s/∂A averaged over heads and rows) for embeddings ``emb`` ``[N, D]``.

    Differentiable w.r.t. ``emb`` (first-order, explicit backward); cost per embedding is independent of depth.
    ``workspace``: a :class:`Workspace` reused across the steps of one optimisation (saves re-allocating the
    kept sign pattern each step); ``basis``: :func:`relevance_basis` of ``state`` (the same map, fewer MACs per
    mask-step once built); ``gemm``: "onednn" (the MLP-side GEMMs, and from
    :data:`worker.engine.cpu_gemm.ONEDNN_MIN_COLUMNS` patch columns on the attention products per head, through oneDNN
    on the CPU, see :mod:`worker.engine.cpu_gemm`) or "blas" (plain matmuls).
    """
    u = F.normalize(emb, dim=-1)
    keep_mask = torch.is_grad_enabled() and emb.requires_grad
    heads = vit.last_block(visual).heads
    if basis is not None:
        return _RelevanceFromBasis.apply(u, basis, state, heads, keep_mask, workspace, gemm)
    w, b = _cotangent_inputs(visual, state, u)
    return _Relevance.apply(w, b, state, block_constants(visual).gemm(gemm), heads, keep_mask, workspace)


def relevance_to_map(rel: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """Patch relevance ``[N, g²]`` -> min-max normalised map ``[N, g*p, g*p]`` (bilinear upsampling)."""
    e = F.interpolate(rel.view(-1, 1, grid, grid), scale_factor=patch, mode="bilinear", align_corners=False)
    e = e[:, 0]
    lo = e.amin(dim=(1, 2), keepdim=True)
    hi = e.amax(dim=(1, 2), keepdim=True)
    return (e - lo) / (hi - lo).clamp_min(1e-12)


def autograd_relevance(visual: torch.nn.Module, pixels: torch.Tensor, pos: torch.Tensor,
                       emb: torch.Tensor) -> torch.Tensor:
    """Reference patch relevance ``[N, n-1]``: the image repeated per embedding, full ViT forward each call,
    ∂s/∂A by autograd with ``create_graph=True`` (so the result is differentiable w.r.t. ``emb``)."""
    view = vit.last_block(visual)
    batch = pixels.expand(emb.shape[0], -1, -1, -1)
    with torch.no_grad():
        x = vit.trunk_forward(visual, batch, pos)
        attn, values = view.attention(x)
    need_graph = torch.is_grad_enabled() and emb.requires_grad
    attn = attn.detach().requires_grad_(True)
    with torch.enable_grad():
        tokens = view.after_attention(x, attn, values).out
        z = F.normalize(view.pooled_feature(tokens), dim=-1)
        s = (F.normalize(emb, dim=-1) * z).sum(-1)
        grad_attn, = torch.autograd.grad(s.sum(), attn, create_graph=need_graph)
    return grad_attn[..., 1:].clamp(min=0).mean(dim=(1, 2))
