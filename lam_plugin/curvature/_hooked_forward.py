"""The hooks backend's forward pass (:mod:`.hooks`): which modules it can hook, the hooked
forward, and the backward passes on it that the per-layer rules turn into the diagonal."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..calling import Batch, ModelCall
from ..geometry import LowRankBlocks, OutputHessian
from ._layer_rules import STOCK, Rule, TokenLinearRule, make_rule, stock_type
from .base import UnsupportedModelError

#: elements of the largest intermediate tensor (about 128 MB in float32)
MAX_ELEMENTS = 2**25
#: relative tolerance of the per-batch gradient check
CHECK_RTOL = 1e-3
#: most directions per chunk of backward passes
CHUNK = 8


def _module_reason(name: str, module: nn.Module, locals_: Sequence[str]) -> str | None:
    """Why the hooks cannot cover parameters ``locals_`` of ``module``, or None."""
    cls = stock_type(module)
    if cls is None:
        kinds = ", ".join(c.__name__ for c in STOCK)
        return (
            f"module {name!r} ({type(module).__name__}) holds subset parameters and is not one of "
            f"{kinds} with its stock forward"
        )
    extra = [n for n in locals_ if n not in STOCK[cls]]
    if extra:
        return f"module {name!r} ({type(module).__name__}) has parameters {extra} outside its forward's rule"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq):
        return f"module {name!r} (Embedding) uses max_norm or scale_grad_by_freq"
    return None


def owners(model: nn.Module, param_names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``module name -> [(parameter name, local name)]`` for the subset, or raise
    ``UnsupportedModelError`` naming what the hooks cannot cover."""
    params = dict(model.named_parameters())
    holders: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(module))
    modules = dict(model.named_modules())
    found: dict[str, list[tuple[str, str]]] = {}
    for name in param_names:
        if name not in params:
            raise ValueError(f"{name!r} is not a parameter of the model")
        mod_name, _, local = name.rpartition(".")
        if len(holders.get(id(params[name]), ())) > 1:
            raise UnsupportedModelError(f"parameter {name!r} is shared by several modules (tied weights)")
        found.setdefault(mod_name, []).append((name, local))
    for mod_name, entries in found.items():
        reason = _module_reason(mod_name or "<model>", modules[mod_name], [local for _, local in entries])
        if reason:
            raise UnsupportedModelError(reason)
    return found


def hooks_support(model: nn.Module, param_names: Sequence[str]) -> str | None:
    """None if the hooks backend covers ``param_names`` of ``model``, else the reason.

    Static: a parameter also used outside its module's forward is found only when a
    batch runs (the backend's gradient check).
    """
    try:
        owners(model, param_names)
    except UnsupportedModelError as err:
        return str(err)
    return None


def leaf_forward(
    model: nn.Module, call: ModelCall, param_names: Sequence[str], x: Batch
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(embedding [B, D], leaves)``: one forward with the subset's parameters replaced by
    detached leaves that require grad (``leaves``, by name) and every other parameter by
    a detached alias. A dict batch is passed as a shallow copy (sentence-transformers
    modules write their outputs into the dict they are given)."""
    subset = set(param_names)
    params = {n: p.detach().requires_grad_(n in subset) for n, p in model.named_parameters()}
    inputs = dict(x) if isinstance(x, Mapping) else x
    with torch.enable_grad():
        emb = call.functional(model, params, inputs)
    return emb, {n: params[n] for n in param_names}


@dataclass
class HookedForward:
    """One forward pass with the subset's modules hooked (:mod:`.hooks`).

    Attributes:
        embedding: ``[B, D]``, with its graph.
        leaves: the subset's parameters as graph leaves, by name.
        rules: per hooked module (by name), its captured calls.
        where: parameter name -> ``(module name, local name)``.
        budget: elements of the largest intermediate tensor.
    """

    embedding: Tensor
    leaves: dict[str, Tensor]
    rules: dict[str, Rule]
    where: dict[str, tuple[str, str]]
    budget: int = MAX_ELEMENTS

    def _passes(self, rules: Sequence[Rule], directions: Tensor) -> Iterator[dict[str, Tensor]]:
        """For each direction ``u [B, D]`` of ``directions [n, B, D]``, one backward pass
        (retaining the graph): the output gradients ``{module: [B, T, O]}``."""
        outs = [o for r in rules for o in r.outputs]
        for u in directions:
            got = torch.autograd.grad(self.embedding, outs, grad_outputs=u, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, got)]
            result, i = {}, 0
            for r in rules:
                result[r.name] = r.tokens([g.unsqueeze(0) for g in grads[i : i + len(r.outputs)]])[0]
                i += len(r.outputs)
            yield result

    def _grads(self, rules: Sequence[Rule], directions: Tensor) -> dict[str, Tensor]:
        """Output gradients ``{module: [n, B, T, O]}`` for ``directions [n, B, D]``."""
        per_pass = list(self._passes(rules, directions))
        return {r.name: torch.stack([p[r.name] for p in per_pass]) for r in rules}

    def check(self) -> None:
        """Two backward passes that check the per-sample rules on this batch.

        * For a random direction on sample 0 only, no other sample's hooked outputs get a
          gradient: the samples are independent (eval mode, outputs broadcast over the
          batch only by adding).
        * For a random direction on all samples, autograd's gradient of every subset
          parameter is the sum of its per-sample gradients: no parameter is used outside
          its module's forward.

        Raises ``UnsupportedModelError`` naming the module or parameter otherwise.
        """
        emb = self.embedding
        u = torch.randn(emb.shape, generator=torch.Generator().manual_seed(0), dtype=emb.dtype).to(emb.device)
        rules = list(self.rules.values())
        if emb.shape[0] > 1:
            first = torch.zeros_like(u)
            first[0] = u[0]
            grads = self._grads(rules, first[None])
            coupled = [r.name for r in rules if bool(grads[r.name][:, 1:].ne(0).any())]
            if coupled:
                raise UnsupportedModelError(
                    f"the outputs of modules {coupled} of one sample change the embedding of another: "
                    "per-sample gradients need samples that do not interact (eval mode, no batch statistics)"
                )
        names = list(self.where)
        leaves = [self.leaves[n] for n in names]
        autograd = torch.autograd.grad(emb, leaves, grad_outputs=u, retain_graph=True, allow_unused=True)
        grads = self._grads(rules, u[None])
        pairs = []
        for name, auto in zip(names, autograd):
            mod, local = self.where[name]
            ours = self.rules[mod].gradient(local, grads[mod]).reshape(-1)
            pairs.append((name, mod, ours, torch.zeros_like(ours) if auto is None else auto.reshape(-1)))
        # gradients that vanish in exact arithmetic (a key bias under softmax) are rounding
        # noise on both sides: compare them on the scale of the whole subset's gradient
        floor = torch.finfo(emb.dtype).eps ** 0.5 * float(torch.cat([a for *_, a in pairs]).norm())
        for name, mod, ours, auto in pairs:
            err = float((ours - auto).norm())
            if err > CHECK_RTOL * float(auto.norm()) + floor:
                raise UnsupportedModelError(
                    f"the gradient of {name!r} is not what module {mod!r} computes from its own inputs "
                    f"(relative difference {err / max(float(auto.norm()), 1e-30):.2g}): the parameter is also used "
                    "outside that module's forward, so the hooks backend cannot cover it"
                )

    def fix_diagonal(self, directions: Tensor, weights: Tensor) -> dict[str, Tensor]:
        """``{parameter: sum_{n,k} weights[n,k] (J_k^T directions[n,k])^2}``, each of the
        parameter's shape, for ``directions [n, B, D]`` and ``weights [n, B]``."""
        rules = list(self.rules.values())
        n_total, bsz = directions.shape[:2]
        per_direction = sum(o.numel() for r in rules for o in r.outputs)
        chunk = max(1, min(n_total, CHUNK, self.budget // max(1, per_direction)))
        for r in rules:
            r.fix_start(chunk, n_total, self.budget)
        for lo in range(0, n_total, chunk):
            for i, grads in enumerate(self._passes(rules, directions[lo : lo + chunk])):
                for r in rules:
                    r.fix_put(i, grads[r.name])
            w = weights.new_zeros(chunk, bsz)
            w[: min(chunk, n_total - lo)] = weights[lo : lo + chunk]
            for r in rules:
                r.fix_add(w)
        results = {r.name: r.fix_result() for r in rules}
        return {name: results[mod][local] for name, (mod, local) in self.where.items()}

    def fix_groups(self, n_total: int, lengths: Tensor | None = None) -> list[tuple[Tensor, int | None]]:
        """Groups of samples for :meth:`fix_diagonal` with ``n_total`` directions, as
        ``(sample indices, tokens to keep or None)``; a block-diagonal G adds up sample by
        sample, so groups can run apart, each with a forward pass of its own.

        Without ``lengths``: the whole batch, or equal groups small enough that every
        token-pair accumulator fits the budget. With ``lengths [B]`` (the tokens each sample
        uses of a right-padded batch): the samples by decreasing length, each group cut to
        its longest sample and as large as the budget allows at that length, so the
        ``T^2`` of the token pairs is paid per length, not at the batch's padded length.
        A sample that does not fit alone squares per-sample gradients instead.
        """
        bsz = self.embedding.shape[0]
        everyone = torch.arange(bsz)
        per_sample = max((r.pair_elements(n_total) for r in self.rules.values()), default=0)
        if lengths is None:
            fits = self.budget // per_sample if per_sample else bsz
            if fits == 0 or fits >= bsz:
                return [(everyone, None)]
            size = math.ceil(bsz / math.ceil(bsz / fits))
            return [(everyone[lo : lo + size], None) for lo in range(0, bsz, size)]
        # the token count of this batch's hooked layers (the longest, where they differ)
        tokens = max((int(r.a.shape[1]) for r in self.rules.values() if isinstance(r, TokenLinearRule)), default=1)
        order = torch.argsort(lengths.cpu(), descending=True, stable=True)
        groups: list[tuple[Tensor, int | None]] = []
        lo = 0
        while lo < bsz:
            longest = max(1, int(lengths[order[lo]]))
            need = per_sample * longest**2 // max(1, tokens) ** 2
            size = max(1, self.budget // need) if need else bsz
            groups.append((order[lo : lo + size], longest))
            lo += size
        if len(groups) == 1 and groups[0][1] == int(lengths.max()) == tokens:
            return [(everyone, None)]
        return groups

    def dense_diagonal(self, g: OutputHessian) -> dict[str, Tensor]:
        """``{parameter: diag(J^T G J)}`` for a dense ``G`` (:mod:`.hooks`)."""
        emb = self.embedding
        bsz, dim = emb.shape
        units = torch.eye(dim, dtype=emb.dtype, device=emb.device)[:, None, :].expand(dim, bsz, dim)
        out: dict[tuple[str, str], Tensor] = {}
        for group in self._groups(dim):
            grads = self._grads(group, units)
            for r in group:
                per_block = r.pair_block_elements(dim)
                if 0 < per_block <= self.budget:  # token pairs, no Jacobian formed
                    diags = {local: grads[r.name].new_zeros(r.shape(local)) for local in r.locals}
                    for k, l, blocks in _all_blocks(g, self.budget // per_block):
                        r.dense_add(grads[r.name], k, l, blocks, diags)
                    out.update({(r.name, local): d for local, d in diags.items()})
                    continue
                for local in r.locals:
                    out[r.name, local] = self._contract(r, local, grads[r.name], g)
        return {name: out[where] for name, where in self.where.items()}

    def _groups(self, dim: int) -> Iterator[list[Rule]]:
        """Modules in groups whose output gradients for ``dim`` directions fit the budget."""
        group: list[Rule] = []
        size = 0
        for r in self.rules.values():
            need = dim * sum(o.numel() for o in r.outputs)
            if group and size + need > self.budget:
                yield group
                group, size = [], 0
            group.append(r)
            size += need
        if group:
            yield group

    def _contract(self, r: Rule, local: str, grads: Tensor, g: OutputHessian) -> Tensor:
        rows, size = r.shape(local)
        diag = torch.zeros(rows, size, dtype=grads.dtype, device=grads.device)
        bsz, dim = self.embedding.shape
        for lo, hi, at in r.row_chunks(local, bsz * dim * size, self.budget):
            diag[at] = g.contract(r.jacobian(local, grads, lo, hi).reshape(bsz, dim, -1)).view(hi - lo, size)
        return diag


def _all_blocks(g: OutputHessian, chunk: int) -> Iterator[tuple[Tensor, Tensor, LowRankBlocks]]:
    """The blocks of G as ``(k [N], l [N], C)`` in chunks of at most ``chunk``: the
    :meth:`~OutputHessian.self_blocks` (``k = l``), then the folded cross blocks."""
    own = g.self_blocks()
    items = torch.arange(own.alpha.shape[0], device=own.alpha.device)
    for lo in range(0, items.numel(), chunk):
        at = slice(lo, lo + chunk)
        yield items[at], items[at], LowRankBlocks(own.alpha[at], own.x[:, at], own.y[:, at])
    yield from g.cross_blocks(chunk)


def batch_size(x: Batch) -> int:
    """Leading size of a tensor batch, or of the first tensor of a dict batch (0 if none)."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.ndim else 0
    first = next((v for v in x.values() if isinstance(v, Tensor) and v.ndim), None)
    return 0 if first is None else first.shape[0]


def same_embedding(a: Tensor, b: Tensor) -> bool:
    """Equal up to rounding (relative to the largest entry of ``b``)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def hooked_forward(
    model: nn.Module, call: ModelCall, param_names: Sequence[str], x: Batch, budget: int = MAX_ELEMENTS
) -> HookedForward:
    """Run the hooked forward pass on ``x``; the hooks are gone when it returns."""
    found = owners(model, param_names)
    modules = dict(model.named_modules())
    rules = {name: make_rule(name, modules[name], [local for _, local in entries]) for name, entries in found.items()}

    bsz = batch_size(x)
    broadcast: list[str] = []

    def hook(rule: Rule) -> Callable[..., Tensor]:
        def capture(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
            inp = args[0] if args else kwargs["input"]
            if out.ndim >= 2 and out.shape[0] == 1 and bsz > 1:
                # one output for the whole batch (BERT's position embeddings of position_ids
                # [1, T]): give every sample its own copy, so that its gradient is per sample
                broadcast.append(rule.name)
                inp, out = inp.expand(bsz, *inp.shape[1:]), out.expand(bsz, *out.shape[1:])
            rule.record(inp, out)
            return out.clone()

        return capture

    handles = [modules[name].register_forward_hook(hook(rule), with_kwargs=True) for name, rule in rules.items()]
    try:
        emb, leaves = leaf_forward(model, call, param_names, x)
    finally:
        for h in handles:
            h.remove()
    if broadcast:  # the embedding with per-sample copies must equal the model's own
        with torch.no_grad():
            plain = call.embed(model, dict(x) if isinstance(x, Mapping) else x)
        if not same_embedding(emb.detach(), plain):
            raise UnsupportedModelError(
                f"module {sorted(set(broadcast))} returns one output for the whole batch, and the model does not "
                "broadcast it over the samples; per-sample gradients are undefined there"
            )
    silent = [f"{name!r} ({type(r.module).__name__})" for name, r in rules.items() if not r.outputs]
    if silent:
        raise UnsupportedModelError(
            f"module {', '.join(silent)} holds subset parameters but did not run in the forward pass "
            "(a parent module may use its parameters functionally, as nn.MultiheadAttention does)"
        )
    for r in rules.values():
        r.prepare(emb.shape[0])
        r.inputs = []
    where = {name: (mod, local) for mod, entries in found.items() for name, local in entries}
    return HookedForward(emb, leaves, rules, where, budget)
