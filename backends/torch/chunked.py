"""Fast pure-PyTorch selective scan: sequential over chunks of T steps, vectorised inside a chunk.

Layout: per-step tensors are viewed as [B, G, Dg, N, T] (G groups of B/C, Dg = D / G channels per
group) so grouped B/C broadcast over their channels without copies.

Inside a chunk, with S_t = sum_{r<=t} log a_r, the recurrence h_t = a_t h_{t-1} + x_t is
    h_t = exp(S_t) * (h_in + cumsum_s(x_s / exp(S_s))_t)
which only needs exp(+-S) to stay finite: a chunk whose |S| exceeds LIMIT is split in halves
(down to single steps), so any decay is handled exactly. Chunks are small (about 2^17 elements)
so every op of a chunk runs on cache-resident data: the loop costs a few Python iterations but
far less memory traffic than whole-sequence ops. The forward saves only each chunk's start state;
the backward walks the chunks in reverse, recomputing that chunk's states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanlib.inputs import BCForm, ScanInputs

_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
_CHUNK_ELEMS = 1 << 17  # target size of one [B, D, N, T] chunk tensor
_MIN_T, _MAX_T = 8, 64


def scan_chunk(log_a: torch.Tensor, x: torch.Tensor, h_in: torch.Tensor | None) -> torch.Tensor:
    """h_t = exp(log_a_t) h_{t-1} + x_t over the last dim (h_{-1} = h_in or 0). Shapes broadcast."""
    T = log_a.shape[-1]
    if T == 1:
        return x + torch.exp(log_a) * h_in.unsqueeze(-1) if h_in is not None else x.clone()
    S = log_a.cumsum(-1)
    lo, hi = torch.aminmax(S)
    if max(-float(lo), float(hi)) > _LIMIT[S.dtype]:  # too steep for exp(+-S): split the chunk
        m = T // 2
        h1 = scan_chunk(log_a[..., :m], x[..., :m], h_in)
        h2 = scan_chunk(log_a[..., m:], x[..., m:], h1[..., -1])
        return torch.cat([h1.expand(*h2.shape[:-1], m), h2], dim=-1)
    eS = S.exp()
    h = (x / eS).cumsum_(-1).mul_(eS)
    if h_in is not None:
        h.addcmul_(eS, h_in.unsqueeze(-1))
    return h


class _Layout:
    """How the tensors of one call map onto [B, G, Dg, N, T]."""

    def __init__(self, inputs: ScanInputs):
        self.b, self.d, self.L, self.n = inputs.batch, inputs.dim, inputs.seqlen, inputs.dstate
        gb = inputs.B_groups if inputs.B_form is not BCForm.CONSTANT else self.d
        gc = inputs.C_groups if inputs.C_form is not BCForm.CONSTANT else self.d
        self.G = gb if gb == gc else self.d
        self.Dg = self.d // self.G
        self.forms = {"B": (inputs.B_form, inputs.B_groups), "C": (inputs.C_form, inputs.C_groups)}
        T = _MAX_T
        while T > _MIN_T and self.b * self.d * self.n * T > _CHUNK_ELEMS:
            T //= 2
        self.T = T

    def chunks(self) -> list[tuple[int, int]]:
        return [(l0, min(l0 + self.T, self.L)) for l0 in range(0, self.L, self.T)]

    def chan(self, t: torch.Tensor) -> torch.Tensor:
        """[B, D, T] -> [B, G, Dg, 1, T]."""
        return t.reshape(t.shape[0], self.G, self.Dg, 1, t.shape[-1])

    def param(self, t: torch.Tensor) -> torch.Tensor:
        """[D, N] -> [1, G, Dg, N, 1]."""
        return t.reshape(1, self.G, self.Dg, t.shape[-1], 1)

    def bc(self, name: str, t: torch.Tensor, l0: int, l1: int) -> torch.Tensor:
        """B or C over [l0, l1) as a tensor broadcastable to [B, G, Dg, N, T]."""
        form, g = self.forms[name]
        if form is BCForm.CONSTANT:
            return t.reshape(1, self.G, self.Dg, self.n, 1)
        t = t[..., l0:l1]
        if form is BCForm.SEQUENCE:
            t = t.unsqueeze(1)
        if g != self.G:  # B and C grouped differently: go per channel
            t = t.repeat_interleave(self.d // g, dim=1)
        return t.unsqueeze(2)

    def reduce_bc(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Gradient broadcastable to [B, G, Dg, N, T] -> the chunk in the input's own form."""
        form, g = self.forms[name]
        T = grad.shape[-1]
        per_chan = grad.expand(self.b, self.G, self.Dg, self.n, T).reshape(
            self.b, self.d, self.n, T
        )
        if form is BCForm.CONSTANT:
            return per_chan.sum((0, 3))
        if form is BCForm.SEQUENCE:
            return per_chan.sum(1)
        return per_chan.reshape(self.b, g, self.d // g, self.n, T).sum(2)


class _Chunk:
    """The recomputable quantities of one chunk [l0, l1)."""

    def __init__(self, inputs: ScanInputs, lay: _Layout, A: torch.Tensor, l0: int, l1: int):
        cdt = inputs.compute_dtype
        self.u = inputs.u[..., l0:l1].to(cdt)
        raw = inputs.delta[..., l0:l1].to(cdt)
        if inputs.delta_bias is not None:
            raw = raw + inputs.delta_bias.to(cdt)[:, None]
        self.raw = raw
        self.dl = F.softplus(raw) if inputs.delta_softplus else raw
        self.Bc = lay.bc("B", inputs.B, l0, l1).to(cdt)
        self.Cc = lay.bc("C", inputs.C, l0, l1).to(cdt)
        self.log_a = lay.chan(self.dl) * A
        self.dlu = lay.chan(self.dl * self.u)
        self.x = self.dlu * self.Bc


def _y(inputs: ScanInputs, lay: _Layout, ch: _Chunk, h: torch.Tensor) -> torch.Tensor:
    y = (h * ch.Cc).sum(3).reshape(lay.b, lay.d, h.shape[-1])
    if inputs.D is not None:
        y = y.addcmul_(ch.u, inputs.D.to(y.dtype)[:, None])
    return y


def scan_fwd(inputs: ScanInputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Forward without autograd: (out [B, D, L], last_state [B, D, N], each chunk's start state)."""
    cdt = inputs.compute_dtype
    lay = _Layout(inputs)
    A = lay.param(inputs.A.to(cdt))
    h = None
    if inputs.initial_state is not None:
        h = inputs.initial_state.to(cdt).reshape(lay.b, lay.G, lay.Dg, lay.n)
    out = torch.empty(lay.b, lay.d, lay.L, dtype=inputs.result_dtype, device=inputs.device)
    starts: list[torch.Tensor | None] = []
    for l0, l1 in lay.chunks():
        starts.append(h)
        ch = _Chunk(inputs, lay, A, l0, l1)
        hs = scan_chunk(ch.log_a, ch.x, h)
        h = hs[..., -1]
        y = _y(inputs, lay, ch, hs)
        if inputs.z is not None:
            y = y.mul_(F.silu(inputs.z[..., l0:l1].to(cdt)))
        out[..., l0:l1] = y
    return out, h.reshape(lay.b, lay.d, lay.n), starts


def scan_bwd(
    inputs: ScanInputs,
    starts: list[torch.Tensor | None],
    dout: torch.Tensor | None,
    dlast: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Gradients of every tensor input; walks the chunks backwards, recomputing their states."""
    cdt = inputs.compute_dtype
    dev = inputs.device
    lay = _Layout(inputs)
    A = lay.param(inputs.A.to(cdt))
    du = torch.empty(lay.b, lay.d, lay.L, dtype=cdt, device=dev)
    ddelta = torch.empty_like(du)
    dz = None if inputs.z is None else torch.empty_like(du)
    dA = torch.zeros(lay.G, lay.Dg, lay.n, dtype=cdt, device=dev)
    dD = None if inputs.D is None else torch.zeros(lay.d, dtype=cdt, device=dev)
    grads_bc: dict[str, torch.Tensor] = {}
    for name in ("B", "C"):
        t = getattr(inputs, name)
        grads_bc[name] = torch.zeros(t.shape, dtype=cdt, device=dev)
    # g at the first step of the chunk after the current one, and that step's log decay
    g_next = None if dlast is None else dlast.to(cdt).reshape(lay.b, lay.G, lay.Dg, lay.n)
    log_a_next = None
    for (l0, l1), h_in in zip(reversed(lay.chunks()), reversed(starts)):
        T = l1 - l0
        ch = _Chunk(inputs, lay, A, l0, l1)
        hs = scan_chunk(ch.log_a, ch.x, h_in)
        dy = (
            torch.zeros(lay.b, lay.d, T, dtype=cdt, device=dev)
            if dout is None
            else dout[..., l0:l1].to(cdt)
        )
        if inputs.z is not None:
            zb = inputs.z[..., l0:l1].to(cdt)
            sig = torch.sigmoid(zb)
            dz[..., l0:l1] = dy * _y(inputs, lay, ch, hs) * sig * (1 + zb * (1 - sig))
            dy = dy * zb * sig
        if inputs.D is not None:
            dD += (dy * ch.u).sum((0, 2))
        dyc = lay.chan(dy)
        # reverse recurrence g_t = a_{t+1} g_{t+1} + dy_t C_t, as a forward scan on flipped time
        c = dyc * ch.Cc
        log_a_shift = ch.log_a[..., 1:]
        if log_a_next is not None:
            log_a_shift = torch.cat([log_a_shift, log_a_next], dim=-1)
        else:
            log_a_shift = F.pad(log_a_shift, (0, 1))
        g = scan_chunk(log_a_shift.flip(-1), c.flip(-1), g_next).flip(-1)
        g_next = g[..., 0].clone()  # g is reused in place below
        log_a_next = ch.log_a[..., :1]
        # through y_t = <C_t, h_t>, x_t = delta_t u_t B_t and a_t = exp(delta_t A)
        for name, grad in (("C", dyc * hs), ("B", g * ch.dlu)):
            part = lay.reduce_bc(name, grad)
            if lay.forms[name][0] is BCForm.CONSTANT:
                grads_bc[name] += part
            else:
                grads_bc[name][..., l0:l1] = part
        d_dlu = (g * ch.Bc).sum(3, keepdim=True)
        dlog_a = g.mul_(hs.sub_(ch.x))  # a_t h_{t-1} = h_t - x_t
        dA += (dlog_a * lay.chan(ch.dl)).sum((0, 4))
        d_dl = (
            (d_dlu * lay.chan(ch.u))
            .add_((dlog_a * A).sum(3, keepdim=True))
            .reshape(lay.b, lay.d, T)
        )
        du_c = d_dlu.reshape(lay.b, lay.d, T) * ch.dl
        if inputs.D is not None:
            du_c.addcmul_(dy, inputs.D.to(cdt)[:, None])
        du[..., l0:l1] = du_c
        if inputs.delta_softplus:
            d_dl = d_dl.mul_(torch.sigmoid(ch.raw))
        ddelta[..., l0:l1] = d_dl
    d_init = None
    if inputs.initial_state is not None:
        d_init = (torch.exp(log_a_next[..., 0]) * g_next).reshape(lay.b, lay.d, lay.n)
    return {
        "u": du,
        "delta": ddelta,
        "A": dA.reshape(lay.d, lay.n),
        "B": grads_bc["B"],
        "C": grads_bc["C"],
        "D": dD,
        "z": dz,
        "delta_bias": None if inputs.delta_bias is None else ddelta.sum((0, 2)),
        "initial_state": d_init,
    }
