"""Fast pure-PyTorch selective scan: chunked over L, vectorised inside chunks, custom backward.

Layout: every per-step tensor is viewed as [B, G, Dg, N, L] (G groups of B/C, Dg = D / G channels
per group) so grouped B/C broadcast over their channels without being copied.

Linear recurrence h_t = a_t h_{t-1} + x_t inside a chunk of T steps, with S_t = sum_{r<=t} log a_r:
    h_t = exp(S_t) * (h_start + sum_{s<=t} exp(-S_s) x_s)
exp(+-S) stays finite because T is picked from the data so that T * max|log a| <= LIMIT; chunks are
joined by a short sequential loop over chunk ends. The sequence is also cut into blocks of Lb steps
whose start states are saved: the backward recomputes one block at a time, so no [B, D, N, L]
tensor for the whole sequence is kept between forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanlib.inputs import BCForm, ScanInputs

_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
_MAX_CHUNK = 64
_BLOCK_ELEMS = 1 << 24  # elements of one [B, D, N, Lb] block


def _chunk_len(log_a: torch.Tensor) -> int:
    """Largest chunk length T <= 64 (power of two) whose per-chunk sum of |log a| stays <= LIMIT."""
    L = log_a.shape[-1]
    if L <= 1 or log_a.numel() == 0:
        return _MAX_CHUNK
    limit = _LIMIT[log_a.dtype]
    T = 8
    pad = -L % T
    sums = F.pad(log_a.abs(), (0, pad)).reshape(-1, (L + pad) // T, T).sum(-1)  # per 8-step chunk
    if float(sums.max()) > limit:
        # rare: decays so steep that 8 steps overflow; finest safe T from the per-step maximum
        m = float(log_a.abs().max())
        T = 1
        while T < 8 and 2 * T * m <= limit:
            T *= 2
        return T
    while T < _MAX_CHUNK and sums.shape[-1] > 1:
        if sums.shape[-1] % 2:
            sums = F.pad(sums, (0, 1))
        sums = sums.reshape(sums.shape[0], -1, 2).sum(-1)
        if float(sums.max()) > limit:
            break
        T *= 2
    return T


def linear_scan(log_a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_a_t) h_{t-1} + x_t along the last dim. log_a, x: [..., L]; h0: [...] (broadcastable).

    Returns (h [..., L], h_last [...]).
    """
    shape = torch.broadcast_shapes(log_a.shape, x.shape)
    L = shape[-1]
    T = _chunk_len(log_a)
    nc = -(-L // T)
    pad = nc * T - L
    la = log_a.expand(shape)
    xx = x.expand(shape)
    if pad:
        la = F.pad(la, (0, pad))
        xx = F.pad(xx, (0, pad))
    la = la.reshape(*shape[:-1], nc, T)
    xx = xx.reshape(*shape[:-1], nc, T)
    S = la.cumsum(-1)
    eS = S.exp()
    if T == 1:  # steps so steep that even one overflows exp(-S): plain recurrence over chunk ends
        local = xx.clone()
    else:
        local = (xx * torch.exp(-S)).cumsum_(-1).mul_(eS)  # chunk-local state from zero
    dec_end = eS[..., -1]
    loc_end = local[..., -1]
    carry = torch.zeros(shape[:-1], dtype=local.dtype, device=local.device) if h0 is None else h0.expand(shape[:-1]).to(local.dtype)
    if nc > 1 or h0 is not None:
        carries = []
        for k in range(nc):
            carries.append(carry)
            carry = dec_end[..., k] * carry + loc_end[..., k]
        cin = torch.stack(carries, dim=-1)
        local = local.addcmul_(eS, cin.unsqueeze(-1))
    else:
        carry = loc_end[..., 0]
    h = local.reshape(*shape[:-1], nc * T)
    if pad:
        h = h[..., :L]
    return h, carry


class _Layout:
    """How the tensors of one call map onto [B, G, Dg, N, L]."""

    def __init__(self, inputs: ScanInputs):
        self.b, self.d, self.L, self.n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
        gb = inputs.B_groups if inputs.B_form is not BCForm.CONSTANT else self.d
        gc = inputs.C_groups if inputs.C_form is not BCForm.CONSTANT else self.d
        self.G = gb if gb == gc else self.d
        self.Dg = self.d // self.G
        self.forms = {"B": (inputs.B_form, inputs.B_groups), "C": (inputs.C_form, inputs.C_groups)}

    def chan(self, t: torch.Tensor) -> torch.Tensor:
        """[B, D, L] -> [B, G, Dg, 1, L]."""
        return t.reshape(t.shape[0], self.G, self.Dg, 1, t.shape[-1])

    def param(self, t: torch.Tensor) -> torch.Tensor:
        """[D, N] -> [1, G, Dg, N, 1]."""
        return t.reshape(1, self.G, self.Dg, t.shape[-1], 1)

    def bc(self, name: str, t: torch.Tensor, l0: int, l1: int) -> torch.Tensor:
        """B or C slice [l0, l1) as a tensor broadcastable to [B, G, Dg, N, Lb]."""
        form, g = self.forms[name]
        if form is BCForm.CONSTANT:
            return t.reshape(1, self.G, self.Dg, self.n, 1)
        t = t[..., l0:l1]
        if form is BCForm.SEQUENCE:
            t = t.unsqueeze(1)
        if g != self.G:  # mixed B/C groupings: go per channel
            t = t.repeat_interleave(self.d // g, dim=1)
        return t.unsqueeze(2)

    def reduce_bc(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Gradient [B, G, Dg, N, Lb] -> the block of the input's own form."""
        form, g = self.forms[name]
        per_chan = grad.reshape(grad.shape[0], self.d, self.n, grad.shape[-1])
        if form is BCForm.CONSTANT:
            return per_chan.sum((0, 3))
        if form is BCForm.SEQUENCE:
            return per_chan.sum(1)
        return per_chan.reshape(grad.shape[0], g, self.d // g, self.n, grad.shape[-1]).sum(2)


def _blocks(lay: _Layout) -> list[tuple[int, int]]:
    Lb = max(_MAX_CHUNK, (_BLOCK_ELEMS // max(1, lay.b * lay.d * lay.n)) // _MAX_CHUNK * _MAX_CHUNK)
    return [(l0, min(l0 + Lb, lay.L)) for l0 in range(0, lay.L, Lb)]


def _delta(inputs_delta: torch.Tensor, delta_bias, softplus: bool, cdt) -> tuple[torch.Tensor, torch.Tensor]:
    raw = inputs_delta.to(cdt)
    if delta_bias is not None:
        raw = raw + delta_bias.to(cdt)[:, None]
    return (F.softplus(raw) if softplus else raw), raw


def scan_fwd(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Forward without autograd. Returns (out [B, D, L], last_state [B, D, N], block start states)."""
    cdt = inputs.compute_dtype
    lay = _Layout(inputs)
    A = lay.param(inputs.A.to(cdt))
    h = None if inputs.initial_state is None else inputs.initial_state.to(cdt).reshape(lay.b, lay.G, lay.Dg, lay.n)
    out = torch.empty(lay.b, lay.d, lay.L, dtype=inputs.result_dtype, device=inputs.device)
    starts = []
    for l0, l1 in _blocks(lay):
        starts.append(h)
        u = inputs.u[..., l0:l1].to(cdt)
        dl, _ = _delta(inputs.delta[..., l0:l1], inputs.delta_bias, inputs.delta_softplus, cdt)
        Bb = lay.bc("B", inputs.B, l0, l1).to(cdt)
        Cb = lay.bc("C", inputs.C, l0, l1).to(cdt)
        log_a = lay.chan(dl) * A
        x = lay.chan(dl * u) * Bb
        hs, h = linear_scan(log_a, x, h)
        y = (hs * Cb).sum(3).reshape(lay.b, lay.d, l1 - l0)
        if inputs.D is not None:
            y = y + u * inputs.D.to(cdt)[:, None]
        if inputs.z is not None:
            y = y * F.silu(inputs.z[..., l0:l1].to(cdt))
        out[..., l0:l1] = y
    return out, h.reshape(lay.b, lay.d, lay.n), starts


def scan_bwd(
    inputs: ScanInputs, starts: list[torch.Tensor | None], dout: torch.Tensor | None, dlast: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Gradients of every tensor input, recomputing one block of states at a time."""
    cdt = inputs.compute_dtype
    lay = _Layout(inputs)
    A = lay.param(inputs.A.to(cdt))
    zeros_like = lambda t: None if t is None else torch.zeros_like(t, dtype=cdt)  # noqa: E731
    du = torch.empty(lay.b, lay.d, lay.L, dtype=cdt, device=inputs.device)
    ddelta = torch.empty_like(du)
    dz = None if inputs.z is None else torch.empty_like(du)
    dA = torch.zeros_like(A.squeeze(0).squeeze(-1))  # [G, Dg, N]
    dD = None if inputs.D is None else torch.zeros(lay.d, dtype=cdt, device=inputs.device)
    dB_parts: list[torch.Tensor] = []
    dC_parts: list[torch.Tensor] = []
    dB_const = zeros_like(inputs.B) if inputs.B_form is BCForm.CONSTANT else None
    dC_const = zeros_like(inputs.C) if inputs.C_form is BCForm.CONSTANT else None
    g_carry = None if dlast is None else dlast.to(cdt).reshape(lay.b, lay.G, lay.Dg, lay.n)
    blocks = _blocks(lay)
    for (l0, l1), h_start in zip(reversed(blocks), reversed(starts)):
        Lb = l1 - l0
        u = inputs.u[..., l0:l1].to(cdt)
        dl, raw = _delta(inputs.delta[..., l0:l1], inputs.delta_bias, inputs.delta_softplus, cdt)
        Bb = lay.bc("B", inputs.B, l0, l1).to(cdt)
        Cb = lay.bc("C", inputs.C, l0, l1).to(cdt)
        dlc, uc = lay.chan(dl), lay.chan(u)
        log_a = dlc * A
        x = lay.chan(dl * u) * Bb
        hs, _ = linear_scan(log_a, x, h_start)
        # output gate and skip term
        dy = torch.zeros(lay.b, lay.d, Lb, dtype=cdt, device=inputs.device) if dout is None else dout[..., l0:l1].to(cdt)
        if inputs.z is not None:
            zb = inputs.z[..., l0:l1].to(cdt)
            y = (hs * Cb).sum(3).reshape(lay.b, lay.d, Lb)
            if inputs.D is not None:
                y = y + u * inputs.D.to(cdt)[:, None]
            sig = torch.sigmoid(zb)
            dz[..., l0:l1] = dy * y * sig * (1 + zb * (1 - sig))
            dy = dy * zb * sig
        du_b = torch.zeros_like(u)
        if inputs.D is not None:
            dD += (dy * u).sum((0, 2))
            du_b += dy * inputs.D.to(cdt)[:, None]
        dyc = lay.chan(dy)
        # reverse recurrence g_t = a_{t+1} g_{t+1} + dy_t C_t, run as a forward scan on flipped time
        c = dyc * Cb
        log_a_next = F.pad(log_a[..., 1:], (0, 1))
        g, _ = linear_scan(log_a_next.flip(-1), c.flip(-1), g_carry)
        g = g.flip(-1)
        g_carry = torch.exp(log_a[..., 0]) * g[..., 0]
        # gradients through C_t <h_t> and through x_t = delta_t u_t B_t
        dC = dyc * hs
        dx = g
        dB = dx * lay.chan(dl * u)
        d_dlu = (dx * Bb).sum(3, keepdim=True)  # d/d(delta*u)  [B, G, Dg, 1, Lb]
        # a_t h_{t-1} = h_t - x_t
        dlog_a = g * (hs - x)
        d_dl = d_dlu * uc + (dlog_a * A).sum(3, keepdim=True)
        dA += (dlog_a * dlc).sum((0, 4))
        du_b += (d_dlu * dlc).reshape(lay.b, lay.d, Lb)
        du[..., l0:l1] = du_b
        d_dl = d_dl.reshape(lay.b, lay.d, Lb)
        if inputs.delta_softplus:
            d_dl = d_dl * torch.sigmoid(raw)
        ddelta[..., l0:l1] = d_dl
        if dB_const is not None:
            dB_const += lay.reduce_bc("B", dB.expand(lay.b, lay.G, lay.Dg, lay.n, Lb))
        else:
            dB_parts.append(lay.reduce_bc("B", dB.expand(lay.b, lay.G, lay.Dg, lay.n, Lb)))
        if dC_const is not None:
            dC_const += lay.reduce_bc("C", dC.expand(lay.b, lay.G, lay.Dg, lay.n, Lb))
        else:
            dC_parts.append(lay.reduce_bc("C", dC.expand(lay.b, lay.G, lay.Dg, lay.n, Lb)))
    dB = dB_const if dB_const is not None else torch.cat(dB_parts[::-1], dim=-1)
    dC = dC_const if dC_const is not None else torch.cat(dC_parts[::-1], dim=-1)
    d_init = None
    if inputs.initial_state is not None:
        d_init = g_carry.reshape(lay.b, lay.d, lay.n)
    dbias = None if inputs.delta_bias is None else ddelta.sum((0, 2))
    return {
        "u": du,
        "delta": ddelta,
        "A": dA.reshape(lay.d, lay.n),
        "B": dB,
        "C": dC,
        "D": dD,
        "z": dz,
        "delta_bias": dbias,
        "initial_state": d_init,
    }
