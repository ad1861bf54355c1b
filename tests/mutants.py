"""Plausible wrong answers to every exercise, and correct alternatives: the judges' own test.

A judge that fails on `raise NotImplementedError` is not yet a judge: it must also fail on what a
student gets wrong (a mask off by one, a missing 1/sqrt(d), the wrong RoPE pairing, Adam without
bias correction, accumulated gradients not divided) and pass on any correct solution written
another way (another loop order, another numerically sound softmax). Each entry below is one such
answer, named for the mistake (or the idea of the alternative):

    mutant(exercise, name, file, (old, new), ...)    text edits on the lines of the exercise: each
                                                     `old` must occur exactly once in the file
    alternative(exercise, name, target, code)        the target's whole body replaced by code
    alternative(exercise, name, edits=[...])         or a correct rewrite by text edits

`python -m tests.exercises mutants [NAME ...]` applies each to a temporary copy of the repository
and runs the exercise's judge: a mutant must make at least one of its tests fail (caught), an
alternative must pass all of them. tests/test_course.py runs FAST, a fixed subset, in the suite;
the whole table is the command (minutes on two cores).

To add a mutant: write the mistake as the smallest edit that makes it, run
`python -m tests.exercises mutants NAME`; if it is MISSED, the judge needs a test that sees it
(against an independent reference, not against this mutant's text).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    exercise: str
    name: str
    correct: bool  # an alternative (must pass) or a mutant (must be caught)
    edits: tuple = ()  # (file, old, new)
    bodies: tuple = ()  # (target, code): the target's region replaced by code


def mutant(exercise: str, name: str, file: str, *edits) -> Variant:
    return Variant(exercise, name, False, tuple((file, old, new) for old, new in edits))


def alternative(exercise: str, name: str, target: str | None = None, code: str | None = None, file: str | None = None,
                edits=()) -> Variant:
    return Variant(exercise, name, True, tuple((file, old, new) for old, new in edits),
                   ((target, code),) if target else ())


VARIANTS = [
    # ------------------------------------------------------------------ the mixture of experts and Muon
    mutant("moe-loop", "outputs-not-weighted-by-the-router", "model.py",
           ("y = y.index_add(0, token, out * weights[token, choice].unsqueeze(-1))", "y = y.index_add(0, token, out)")),
    mutant("moe-loop", "every-slot-weighted-as-the-first-choice", "model.py",
           ("out * weights[token, choice].unsqueeze(-1)", "out * weights[token, 0].unsqueeze(-1)")),
    mutant("moe-loop", "capacity-keeps-the-last-slots", "model.py",
           ("choice, token = choice[:capacity], token[:capacity]", "choice, token = choice[-capacity:], token[-capacity:]")),
    mutant("moe-loop", "each-expert-overwrites-the-last", "model.py",
           ("y = y.index_add(0, token, out * weights", "y = y.index_copy(0, token, out * weights")),
    alternative("moe-loop", "slot-by-slot-lists", "model.MoE.forward_loop", """
        y = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, weights.dtype))
        N, k = chosen.shape
        for e in range(self.n_experts):
            slots = [(j, t) for j in range(k) for t in range(N) if int(chosen[t, j]) == e]  # first choices first
            if capacity is not None:
                slots = slots[:capacity]
            if not slots:
                continue
            choice = torch.tensor([j for j, _ in slots], device=x.device)
            token = torch.tensor([t for _, t in slots], device=x.device)
            y = y.index_add(0, token, self.experts.expert(e, x[token]) * weights[token, choice].unsqueeze(-1))
        return y
    """),
    mutant("moe-router", "bias-enters-the-weights", "model.py",
           ("weights = probs.gather(-1, chosen)  # (N, k)", "weights = (probs + self.expert_bias).gather(-1, chosen)  # (N, k)")),
    mutant("moe-router", "bias-ignored-in-the-choice", "model.py",
           ("torch.topk(probs.detach() + self.expert_bias, self.topk", "torch.topk(probs.detach(), self.topk")),
    mutant("moe-router", "sigmoid-weights-not-normalised", "model.py",
           ("weights = weights / weights.sum(-1, keepdim=True)  # DeepSeek-V3", "weights = weights  # DeepSeek-V3")),
    mutant("moe-router", "softmax-over-tokens-not-experts", "model.py",
           ("F.softmax(logits, dim=-1) if self.router_kind", "F.softmax(logits, dim=0) if self.router_kind")),
    alternative("moe-router", "argsort-and-explicit-formulas", "model.MoE.route", """
        logits = self.router(x)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.router_kind == "softmax":
            probs = torch.exp(logits - logits.amax(-1, keepdim=True))
            probs = probs / probs.sum(-1, keepdim=True)
        else:
            probs = 1 / (1 + torch.exp(-logits))
        chosen = torch.argsort(probs.detach() + self.expert_bias, dim=-1, descending=True)[:, :self.topk]
        weights = torch.gather(probs, 1, chosen)
        if self.router_kind == "sigmoid":
            weights = weights / weights.sum(dim=1, keepdim=True)
        return logits, probs, chosen, weights
    """),
    mutant("newton-schulz", "not-normalised-first", "parallel.py",
           ("X = G / (G.norm() + 1e-7)  # 1e-7", "X = G.clone()  # 1e-7")),
    mutant("newton-schulz", "gram-on-the-wrong-side", "parallel.py",
           ("gram = X @ X.mT  # (m, n) x (n, m)", "gram = X.mT @ X  # (m, n) x (n, m)")),
    mutant("newton-schulz", "cubic-and-quintic-coefficients-swapped", "parallel.py",
           ("X = a * X + (b * gram + c * gram @ gram) @ X", "X = a * X + (c * gram + b * gram @ gram) @ X")),
    mutant("newton-schulz", "tall-result-not-transposed-back", "parallel.py",
           ("    return X.mT if tall else X\n", "    return X\n")),
    alternative("newton-schulz", "tall-multiplied-on-the-right", "parallel.newton_schulz", """
        a, b, c = NS_COEFFICIENTS
        X = G / (torch.linalg.matrix_norm(G) + 1e-7)
        for _ in range(steps):
            if X.size(0) > X.size(1):
                A = X.mT @ X  # (B, B) = V S^2 V^T, so X A = U S^3 V^T
                X = a * X + X @ (b * A + c * A @ A)
            else:
                A = X @ X.mT  # (A, A) = U S^2 U^T
                X = a * X + (b * A + c * A @ A) @ X
        return X
    """),
    mutant("muon", "orthogonalises-the-momentum-not-the-nesterov-step", "parallel.py",
           ("ortho = newton_schulz(nesterov, group[\"ns_steps\"])", "ortho = newton_schulz(buf, group[\"ns_steps\"])")),
    mutant("muon", "without-kimis-rms-scale", "parallel.py",
           ("p.add_(ortho.to(p.dtype), alpha=-group[\"lr\"] * muon_scale(p.shape))", "p.add_(ortho.to(p.dtype), alpha=-group[\"lr\"])")),
    mutant("muon", "no-weight-decay", "parallel.py",
           ("p.mul_(1 - group[\"lr\"] * group[\"weight_decay\"])  # decoupled", "p.mul_(1.0)  # decoupled")),
    mutant("muon", "momentum-summed-not-averaged", "parallel.py",
           ("buf.lerp_(p.grad, 1 - mu)  # M = mu M + (1 - mu) G", "buf.mul_(mu).add_(p.grad)  # M = mu M + (1 - mu) G")),
    alternative("muon", "the-formula-written-out", "parallel.Muon.update", """
        if p.grad is None:
            return
        mu, buf = group["momentum"], self.state[p]["momentum_buffer"]
        buf.mul_(mu).add_(p.grad, alpha=1 - mu)
        step = mu * buf + (1 - mu) * p.grad
        ortho = newton_schulz(step, group["ns_steps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(group["lr"] * muon_scale(p.shape) * ortho.to(p.dtype))
    """),
    # ------------------------------------------------------------------ model.py
    mutant("rmsnorm", "sum-instead-of-mean", "model.py", ("xf.pow(2).mean(-1, keepdim=True)", "xf.pow(2).sum(-1, keepdim=True)")),
    mutant("rmsnorm", "multiplies-by-the-rms", "model.py", ("torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
                                                            "torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)")),
    mutant("rmsnorm", "no-gain", "model.py", (".type_as(x) * self.weight", ".type_as(x)")),
    mutant("rmsnorm", "centres-like-layernorm", "model.py", ("xf = at_least_float32(x)\n",
                                                             "xf = at_least_float32(x)\n        xf = xf - xf.mean(-1, keepdim=True)\n")),
    mutant("rmsnorm", "eps-outside-the-root", "model.py", ("xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)",
                                                           "xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)")),
    mutant("rmsnorm", "over-the-wrong-dim", "model.py", ("xf.pow(2).mean(-1, keepdim=True)", "xf.pow(2).mean(0, keepdim=True)")),
    alternative("rmsnorm", "written-with-sqrt-and-division", "model.RMSNorm.forward", """
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rms = torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps)
        return (xf / rms).to(x.dtype) * self.weight
    """),

    mutant("layernorm", "unbiased-variance", "model.py", ("return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)",
                                                          "mu = x.mean(-1, keepdim=True)\n        y = (x - mu) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5) * self.weight\n        return y if self.bias is None else y + self.bias")),
    mutant("layernorm", "no-centring", "model.py", ("return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)",
                                                    "y = x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight\n        return y if self.bias is None else y + self.bias")),
    mutant("layernorm", "bias-forgotten", "model.py", ("return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)",
                                                       "return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)")),
    mutant("layernorm", "statistics-over-the-batch", "model.py", ("return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)",
                                                                  "mu = x.mean(0, keepdim=True)\n        y = (x - mu) / torch.sqrt(x.var(0, keepdim=True, unbiased=False) + 1e-5) * self.weight\n        return y if self.bias is None else y + self.bias")),
    alternative("layernorm", "written-out", "model.LayerNorm.forward", """
        mean = x.mean(dim=-1, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # the biased variance, as the paper's
        y = (x - mean) * torch.rsqrt(var + 1e-5) * self.weight
        return y if self.bias is None else y + self.bias
    """),

    mutant("swiglu", "gate-and-up-swapped", "model.py", ("h = F.silu(gate) * up", "h = F.silu(up) * gate")),
    mutant("swiglu", "sigmoid-not-silu", "model.py", ("h = F.silu(gate) * up", "h = torch.sigmoid(gate) * up")),
    mutant("swiglu", "gelu-gate", "model.py", ("h = F.silu(gate) * up", "h = F.gelu(gate) * up")),
    mutant("swiglu", "interleaved-split", "model.py", ("gate, up = h.chunk(2, dim=-1)\n            h = F.silu(gate) * up",
                                                       "gate, up = h[..., ::2], h[..., 1::2]\n            h = F.silu(gate) * up")),
    alternative("swiglu", "sigmoid-written-out", edits=[("gate, up = h.chunk(2, dim=-1)\n            h = F.silu(gate) * up",
                                                         "hidden = h.size(-1) // 2\n            gate, up = h[..., :hidden], h[..., hidden:]\n            h = gate * torch.sigmoid(gate) * up")],
                file="model.py"),

    mutant("rope", "interleaved-pairs", "model.py", ("x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each",
                                                     "x1, x2 = x[..., ::2], x[..., 1::2]")),
    mutant("rope", "rotates-backwards", "model.py", ("[x1 * cos - x2 * sin, x1 * sin + x2 * cos]", "[x1 * cos + x2 * sin, -x1 * sin + x2 * cos]")),
    mutant("rope", "positions-start-at-1", "model.py", ("cos, sin = cos[:T], sin[:T]", "cos, sin = cos[1:T + 1], sin[1:T + 1]")),
    mutant("rope", "table-not-cut-to-T", "model.py", ("cos, sin = cos[:T], sin[:T]", "pass")),
    mutant("rope", "sin-cos-swapped", "model.py", ("[x1 * cos - x2 * sin, x1 * sin + x2 * cos]", "[x1 * sin - x2 * cos, x1 * cos + x2 * sin]")),
    alternative("rope", "complex-multiplication", "model.apply_rope", """
        T, half = x.size(-2), x.size(-1) // 2
        z = torch.complex(x[..., :half].double(), x[..., half:].double())  # pair (x_i, x_{i+hs/2}) as x_i + i x_{i+hs/2}
        if cos.dim() == 2:  # a table by position; else already one row of angles per sequence (document masking)
            cos, sin = cos[:T], sin[:T]
        z = z * torch.complex(cos.double(), sin.double())  # e^{i m theta_i}
        return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)
    """),

    mutant("repeat-kv", "tiled-not-interleaved", "model.py", ("x.repeat_interleave(n_rep, dim=1)", "x.repeat(1, n_rep, 1, 1)")),
    mutant("repeat-kv", "repeated-along-time", "model.py", ("x.repeat_interleave(n_rep, dim=1)", "x.repeat_interleave(n_rep, dim=2)")),
    mutant("repeat-kv", "first-head-for-all", "model.py", ("x.repeat_interleave(n_rep, dim=1)", "x[:, :1].expand(-1, x.size(1) * n_rep, -1, -1)")),
    alternative("repeat-kv", "expand-and-reshape", "model.repeat_kv", """
        B, n_kv, T, hs = x.shape
        return x[:, :, None].expand(B, n_kv, n_rep, T, hs).reshape(B, n_kv * n_rep, T, hs)
    """),

    mutant("attention", "mask-off-by-one-hides-self", "model.py", ("dtype=torch.bool, device=q.device).triu(1)  # True above",
                                                                   "dtype=torch.bool, device=q.device).triu(0)  # True above")),
    mutant("attention", "mask-off-by-one-sees-next", "model.py", ("dtype=torch.bool, device=q.device).triu(1)  # True above",
                                                                  "dtype=torch.bool, device=q.device).triu(2)  # True above")),
    mutant("attention", "no-1-over-sqrt-d", "model.py", ("att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))",
                                                         "att = q @ k.transpose(-2, -1)")),
    mutant("attention", "divides-by-d", "model.py", ("att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))",
                                                     "att = (q @ k.transpose(-2, -1)) * (1.0 / q.size(-1))")),
    mutant("attention", "softmax-over-queries", "model.py", ("att = F.softmax(at_least_float32(att), dim=-1).type_as(q)",
                                                             "att = F.softmax(at_least_float32(att), dim=-2).type_as(q)")),
    mutant("attention", "softmax-in-float32-always", "model.py", ("att = F.softmax(at_least_float32(att), dim=-1).type_as(q)",
                                                                  "att = F.softmax(att.float(), dim=-1).type_as(q)")),
    alternative("attention", "max-subtracted-softmax-by-hand", "model.naive_attention", """
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        T, hs = q.size(-2), q.size(-1)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hs)
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))
        if doc_ids is not None:  # keys of the same document only: (B, 1, T, T)
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        scores = at_least_float32(scores).masked_fill(~allowed, -1e30)  # a large negative: exp underflows to 0 all the same
        weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        weights = (weights / weights.sum(dim=-1, keepdim=True)).type_as(q)
        weights = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
        return torch.einsum("bhij,bhjd->bhid", weights, v)
    """),

    mutant("self-attention", "heads-split-without-transpose", "model.py",
           ("q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, T, nh*hs) -> (B, nh, T, hs)",
            "q = q.view(B, self.n_head, T, self.hs)")),
    mutant("self-attention", "heads-merged-without-transpose", "model.py",
           ("y = y.transpose(1, 2).contiguous().view(B, T, -1)", "y = y.contiguous().view(B, T, -1)")),
    mutant("self-attention", "k-and-v-swapped", "model.py",
           ("q, k, v = qkv.split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)",
            "q, v, k = qkv.split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)")),
    mutant("self-attention", "rope-restarts-at-0-with-a-cache", "model.py",
           ("cos, sin = self.rope_cos[start:], self.rope_sin[start:]", "cos, sin = self.rope_cos, self.rope_sin")),
    mutant("self-attention", "rope-on-queries-only", "model.py",
           ("q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)", "q = apply_rope(q, cos, sin)")),
    alternative("self-attention", "reshape-and-permute", "model.CausalSelfAttention.forward", """
        B, T, _ = x.shape
        start = 0 if kv_cache is None else kv_cache.length
        q_size, kv_size = self.n_head * self.hs, self.n_kv_head * self.hs
        qkv = self.c_attn(x)
        q = qkv[..., :q_size].reshape(B, T, self.n_head, self.hs).permute(0, 2, 1, 3)
        k = qkv[..., q_size:q_size + kv_size].reshape(B, T, self.n_kv_head, self.hs).permute(0, 2, 1, 3)
        v = qkv[..., q_size + kv_size:].reshape(B, T, self.n_kv_head, self.hs).permute(0, 2, 1, 3)
        if self.rope:
            q = apply_rope(q, self.rope_cos[start:start + T], self.rope_sin[start:start + T])
            k = apply_rope(k, self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            y = cached_attention(q, k, v)
        else:
            y = attend(self.backend, q, k, v, self.dropout if self.training else 0.0)
        y = y.permute(0, 2, 1, 3).reshape(B, T, y.size(1) * y.size(3))
        return self.resid_dropout(self.c_proj(y))
    """),

    mutant("sampling", "top-k-keeps-k-plus-1", "model.py", ("kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]",
                                                            "kth = torch.topk(logits, min(top_k + 1, logits.size(-1))).values[:, [-1]]")),
    mutant("sampling", "top-k-drops-the-kth", "model.py", ("logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
                                                           "logits = logits.masked_fill(logits <= kth, float(\"-inf\"))")),
    mutant("sampling", "nucleus-stops-before-reaching-p", "model.py", ("mass_before = probs.cumsum(dim=-1) - probs",
                                                                       "mass_before = probs.cumsum(dim=-1)")),
    mutant("sampling", "nucleus-mask-left-in-sorted-order", "model.py",
           ("drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)", "drop = drop_sorted")),
    alternative("sampling", "sort-once-and-threshold", "model.filter_logits", """
        out = logits.clone()
        if top_k is not None and top_k < logits.size(-1):
            kth_largest = logits.sort(dim=-1, descending=True).values[:, top_k - 1:top_k]
            out[logits < kth_largest] = float("-inf")
        if top_p is not None and top_p < 1:
            probs = torch.softmax(out, dim=-1)
            for row in range(out.size(0)):  # a loop over the batch: slow and obviously right
                mass = 0.0
                for i in torch.argsort(probs[row], descending=True).tolist():
                    if mass >= top_p:
                        out[row, i] = float("-inf")
                    mass += probs[row, i].item()
        return out
    """),

    # ------------------------------------------------------------------ data.py
    mutant("bpe-merge", "overlapping-merges", "data.py", ("            out.append(new)\n            i += 2", "            out.append(new)\n            i += 1")),
    mutant("bpe-merge", "only-the-first-occurrence", "data.py",
           ("        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:\n            out.append(new)\n            i += 2",
            "        if i + 1 < len(word) and word[i] == a and word[i + 1] == b and new not in out:\n            out.append(new)\n            i += 2")),
    mutant("bpe-merge", "right-to-left", "data.py", ("    out, i = [], 0\n    while i < len(word):",
                                                     "    word = word[::-1]\n    a, b = b, a\n    out, i = [], 0\n    while i < len(word):"),
           ("            i += 1\n    return out\n", "            i += 1\n    return out[::-1]\n")),
    mutant("bpe-merge", "checks-only-the-first-token", "data.py", ("word[i] == a and word[i + 1] == b", "word[i] == a")),
    alternative("bpe-merge", "scan-with-a-flag", "data._merge_word", """
        out, skip = [], False
        for i, token in enumerate(word):
            if skip:  # the second half of a pair just merged
                skip = False
            elif token == a and i + 1 < len(word) and word[i + 1] == b:
                out.append(new)
                skip = True
            else:
                out.append(token)
        return out
    """),

    mutant("tokenizer", "pairs-counted-once-per-word", "data.py", ("            pair_counts[pair] += f\n            pair_words.setdefault(pair, set()).add(wi)", "            pair_counts[pair] += 1\n            pair_words.setdefault(pair, set()).add(wi)")),
    mutant("tokenizer", "stale-heap-entries-used", "data.py", ("        if pair_counts.get(pair, 0) != -neg:\n            continue  # stale entry: the count changed since it was pushed\n",
                                                              "        if pair_counts.get(pair, 0) <= 0:\n            continue\n")),
    mutant("tokenizer", "one-merge-short", "data.py", ("while len(ranks) < vocab_size - 1 and heap:", "while len(ranks) < vocab_size - 2 and heap:")),
    mutant("tokenizer", "eot-outside-the-vocabulary", "data.py", ("mergeable_ranks=ranks, special_tokens={EOT: vocab_size - 1})", "mergeable_ranks=ranks, special_tokens={EOT: vocab_size})")),
    alternative("tokenizer", "naive-recount-every-merge", "data.train_bpe", """
        if vocab_size < 257:
            raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: use at least 257")
        words = {tuple(bytes([b]) for b in w): c for w, c in _word_counts(texts, max_train_bytes).items()}
        ranks = {bytes([i]): i for i in range(256)}
        while len(ranks) < vocab_size - 1:
            pairs = Counter()
            for w, c in words.items():
                for pair in zip(w, w[1:]):
                    pairs[pair] += c
            if not pairs:
                break
            best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then the smallest bytes
            merged = best[0] + best[1]
            ranks.setdefault(merged, len(ranks))
            new_words = Counter()
            for w, c in words.items():
                out, i = [], 0
                while i < len(w):
                    if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                        out.append(merged)
                        i += 2
                    else:
                        out.append(w[i])
                        i += 1
                new_words[tuple(out)] += c
            words = new_words
        return tiktoken.Encoding(name=f"bpe{vocab_size}", pat_str=PATTERN, mergeable_ranks=ranks,
                                 special_tokens={EOT: vocab_size - 1})
    """),

    mutant("minhash", "max-not-min", "data.py", ("sig = np.full((num_perm, len(per_doc)), np.iinfo(np.uint64).max, dtype=np.uint64)",
                                                 "sig = np.zeros((num_perm, len(per_doc)), dtype=np.uint64)"),
           ("sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(hashed, starts, axis=1))",
            "sig[:, docs] = np.maximum(sig[:, docs], np.maximum.reduceat(hashed, starts, axis=1))")),
    mutant("minhash", "no-offset-b", "data.py", ("        hashed += b  # + (K, 1), mod 2^64\n", "")),
    mutant("minhash", "forgets-earlier-blocks", "data.py", ("sig[:, docs] = np.minimum(sig[:, docs], np.minimum.reduceat(hashed, starts, axis=1))",
                                                            "sig[:, docs] = np.minimum.reduceat(hashed, starts, axis=1)")),
    mutant("minhash", "low-32-bits", "data.py", ("return (sig >> np.uint64(32)).T.astype(np.uint32)", "return sig.T.astype(np.uint32)")),
    alternative("minhash", "one-document-at-a-time", "data.minhash_signatures", """
        mix, a, b = _hash_params(num_perm, ngram, seed)
        out = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        for d, text in enumerate(texts):
            x = shingles(text, ngram, mix)
            if len(x):  # (K, 1) * (1, S) + (K, 1), mod 2^64; the top 32 bits of each, then the minimum
                out[d] = ((a * x[None, :] + b) >> np.uint64(32)).min(axis=1).astype(np.uint32)
        return out
    """),

    mutant("lsh", "bands-overlap", "data.py", ("sig[:, band * rows:(band + 1) * rows]  # (N, r)", "sig[:, band:band + rows]  # (N, r)")),
    mutant("lsh", "first-row-of-the-band-only", "data.py", ("keys = (columns.astype(np.uint64) * fold).sum(axis=1)  # (N,)",
                                                            "keys = columns[:, 0].astype(np.uint64)  # (N,)")),
    mutant("lsh", "buckets-of-two-ignored", "data.py", ("for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):",
                                                        "for start, size in zip(starts[sizes > 2], sizes[sizes > 2]):")),
    mutant("lsh", "empty-documents-share-a-bucket", "data.py", ("        keys[empty] = np.arange(n)[empty].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # own buckets\n", "")),
    alternative("lsh", "dictionary-of-buckets", "data.lsh_candidates", """
        n, k = sig.shape
        if bands * rows > k:
            raise ValueError(f"bands*rows = {bands * rows} exceeds the {k} hashes per signature: lower bands or rows")
        empty = (sig == np.iinfo(np.uint32).max).all(axis=1)
        found = set()
        for band in range(bands):
            buckets = {}
            for d in range(n):
                if not empty[d]:
                    buckets.setdefault(sig[d, band * rows:(band + 1) * rows].tobytes(), []).append(d)
            for members in buckets.values():
                found.update((i, j) for x, i in enumerate(members) for j in members[x + 1:])
        return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)
    """),

    mutant("gopher", "overlaps-counted-twice", "data.py", ("covered = int((last - np.maximum(first, reach)).sum())", "covered = int((last - first).sum())")),
    mutant("gopher", "first-occurrence-counted", "data.py", ("repeat = np.flatnonzero(ids < np.arange(len(ids)))",
                                                               "repeat = np.flatnonzero(np.bincount(ids, minlength=len(ids))[ids] > 1)")),
    mutant("gopher", "covers-only-the-first-word", "data.py", ("first, last = start[repeat], end[repeat + n - 1]", "first, last = start[repeat], end[repeat]")),
    mutant("gopher", "characters-not-a-fraction", "data.py", ("if covered / total > GOPHER_MAX_DUPLICATE_NGRAM_CHARS[n]:", "if covered > GOPHER_MAX_DUPLICATE_NGRAM_CHARS[n]:")),
    alternative("gopher", "a-flag-per-character", "data.gopher_duplicate_ngrams", """
        text = doc["text"]
        spans = [(m.start(), m.end()) for m in _NOT_SPACE.finditer(text)]
        words = [text[a:b] for a, b in spans]
        for n, limit in GOPHER_MAX_DUPLICATE_NGRAM_CHARS.items():
            flags, seen = bytearray(len(text)), set()
            for i in range(len(words) - n + 1):
                gram = tuple(words[i:i + n])
                if gram in seen:
                    flags[spans[i][0]:spans[i + n - 1][1]] = b"\\x01" * (spans[i + n - 1][1] - spans[i][0])
                seen.add(gram)
            fraction = sum(flags) / max(1, len(text))
            if fraction > limit:
                return f"repeated {n}-grams cover {fraction:.0%} of characters"
    """),

    mutant("pii", "ip-before-email", "data.py", ("    text = _EMAIL.sub(replace(\"email\"), text)\n    text = _IPV6_CANDIDATE.sub(replace(\"ip\", _ipv6), text)\n    text = _IPV4.sub(replace(\"ip\"), text)\n",
                                                 "    text = _IPV6_CANDIDATE.sub(replace(\"ip\", _ipv6), text)\n    text = _IPV4.sub(replace(\"ip\"), text)\n    text = _EMAIL.sub(replace(\"email\"), text)\n")),
    mutant("pii", "phone-numbers-unchecked", "data.py", ("text = _PHONE.sub(replace(\"phone\", _phone), text)", "text = _PHONE.sub(replace(\"phone\"), text)")),
    mutant("pii", "ipv6-unchecked", "data.py", ("text = _IPV6_CANDIDATE.sub(replace(\"ip\", _ipv6), text)", "text = _IPV6_CANDIDATE.sub(replace(\"ip\"), text)")),
    mutant("pii", "rejected-matches-counted", "data.py", ("            if check is not None and not check(m):\n                return m.group()\n            counts[kind] += 1\n",
                                                          "            counts[kind] += 1\n            if check is not None and not check(m):\n                return m.group()\n")),
    alternative("pii", "a-table-of-passes", "data.mask_pii", """
        counts = Counter()
        passes = (("email", _EMAIL, None), ("ip", _IPV6_CANDIDATE, _ipv6), ("ip", _IPV4, None), ("phone", _PHONE, _phone))
        for kind, pattern, check in passes:  # in this order: an e-mail's domain may hold an address's digits
            def sub(m, kind=kind, check=check):
                if check and not check(m):
                    return m.group()
                counts[kind] += 1
                return PII_PLACEHOLDERS[kind]
            text = pattern.sub(sub, text)
        return text, counts
    """),

    # ------------------------------------------------------------------ train.py and the training half of parallel.py
    mutant("lr-schedule", "warmup-starts-at-zero", "train.py", ("return peak * (step + 1) / cfg.warmup_iters", "return peak * step / cfg.warmup_iters")),
    mutant("lr-schedule", "cosine-decays-to-zero", "train.py", ("return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))",
                                                                "return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))")),
    mutant("lr-schedule", "cosine-over-all-steps", "train.py", ("progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)",
                                                                "progress = step / max(1, cfg.max_iters)")),
    mutant("lr-schedule", "wsd-decays-from-the-start", "train.py", ("    if step < decay_start:\n        return peak\n", "")),
    mutant("lr-schedule", "cosine-climbs-back-after-max-iters", "train.py", ("(1 + math.cos(math.pi * min(1.0, progress)))",
                                                                            "(1 + math.cos(math.pi * progress))")),
    mutant("lr-schedule", "half-cosine-period", "train.py", ("(1 + math.cos(math.pi * min(1.0, progress)))", "(1 + math.cos(2 * math.pi * min(1.0, progress)))")),
    alternative("lr-schedule", "phases-as-fractions", "train.learning_rate_at", """
        peak = cfg.learning_rate
        floor = peak * cfg.min_lr_ratio
        if step < cfg.warmup_iters:
            return peak * (step + 1) / cfg.warmup_iters
        if cfg.schedule == "cosine":
            done = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
            return floor + (peak - floor) * (0.5 + 0.5 * math.cos(math.pi * done))
        decay_steps = int(cfg.decay_frac * cfg.max_iters)
        start = cfg.max_iters - decay_steps
        if step < start:
            return peak
        done = min(1.0, (step - start) / max(1, decay_steps))
        return (1 - done) * peak + done * floor
    """),

    mutant("grad-clip", "no-clamp-scales-up", "parallel.py", ("coef = (max_norm / (total + 1e-6)).clamp(max=1.0)", "coef = max_norm / (total + 1e-6)")),
    mutant("grad-clip", "returns-the-clipped-norm", "parallel.py", ("            g.mul_(coef)\n        return float(total)", "            g.mul_(coef)\n        return float(total * coef)")),
    mutant("grad-clip", "sum-of-per-tensor-norms", "parallel.py", ("                sum_sq += g.float().pow(2).sum()", "                sum_sq += g.float().norm()"),
           ("        total = sum_sq.sqrt()", "        total = sum_sq")),
    mutant("grad-clip", "norm-not-summed-across-ranks", "parallel.py", ("            all_reduce(sum_sq, dist.group.WORLD, \"clip\")\n", "            pass\n")),
    alternative("grad-clip", "squares-as-one-vector", edits=[
        ("        sum_sq = torch.zeros((), device=self.layout.device)\n        for name, g in grads.items():\n            if self.counted[name]:\n                sum_sq += g.float().pow(2).sum()\n",
         "        counted = [g.float().reshape(-1) for name, g in grads.items() if self.counted[name]]\n        sum_sq = torch.cat(counted).dot(torch.cat(counted)) if counted else torch.zeros((), device=self.layout.device)\n"),
        ("        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's formula, 1e-6 included",
         "        coef = torch.minimum(max_norm / (total + 1e-6), torch.ones_like(total))")], file="parallel.py"),

    mutant("adamw", "no-bias-correction", "parallel.py", ("denom = (state[\"exp_avg_sq\"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)", "denom = state[\"exp_avg_sq\"].sqrt().add_(eps)"),
           ("p.addcdiv_(state[\"exp_avg\"], denom, value=-lr / (1 - beta1**t))", "p.addcdiv_(state[\"exp_avg\"], denom, value=-lr)")),
    mutant("adamw", "first-moment-uncorrected", "parallel.py", ("p.addcdiv_(state[\"exp_avg\"], denom, value=-lr / (1 - beta1**t))", "p.addcdiv_(state[\"exp_avg\"], denom, value=-lr)")),
    mutant("adamw", "l2-in-the-gradient-not-decoupled", "parallel.py", ("                p.mul_(1 - lr * self.decay[p])\n", "                p.grad.add_(p, alpha=self.decay[p])\n")),
    mutant("adamw", "decay-after-the-update", "parallel.py", ("                p.mul_(1 - lr * self.decay[p])\n", ""),
           ("p.addcdiv_(state[\"exp_avg\"], denom, value=-lr / (1 - beta1**t))", "p.addcdiv_(state[\"exp_avg\"], denom, value=-lr / (1 - beta1**t))\n                p.mul_(1 - lr * self.decay[p])")),
    mutant("adamw", "eps-inside-the-root", "parallel.py", ("denom = (state[\"exp_avg_sq\"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)",
                                                        "denom = (state[\"exp_avg_sq\"] / (1 - beta2**t)).add_(eps).sqrt()")),
    mutant("adamw", "betas-swapped", "parallel.py", ("lr, (beta1, beta2), eps = group[\"lr\"], group[\"betas\"], group[\"eps\"]", "lr, (beta2, beta1), eps = group[\"lr\"], group[\"betas\"], group[\"eps\"]")),
    alternative("adamw", "bias-corrected-moments-written-out", "parallel.ShardedAdamW.step", """
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t = int(state["step"].item())
                g = p.grad
                state["exp_avg"].copy_(b1 * state["exp_avg"] + (1 - b1) * g)
                state["exp_avg_sq"].copy_(b2 * state["exp_avg_sq"] + (1 - b2) * g * g)
                m_hat = state["exp_avg"] / (1 - b1**t)
                v_hat = state["exp_avg_sq"] / (1 - b2**t)
                p.copy_(p * (1 - lr * self.decay[p]) - lr * m_hat / (v_hat.sqrt() + eps))
    """),

    mutant("grad-accum", "accumulated-not-divided", "train.py", ("loss_sum += par.forward_backward(x, y, divisor=cfg.grad_accum, sync=micro == cfg.grad_accum - 1)",
                                                                 "loss_sum += par.forward_backward(x, y, divisor=1, sync=micro == cfg.grad_accum - 1)")),
    mutant("grad-accum", "loss-summed-not-averaged", "train.py", ("loss = par.reduce_loss(loss_sum / cfg.grad_accum)", "loss = par.reduce_loss(loss_sum)")),
    mutant("grad-accum", "sync-on-every-micro-step", "train.py", ("divisor=cfg.grad_accum, sync=micro == cfg.grad_accum - 1)", "divisor=cfg.grad_accum, sync=True)")),
    mutant("grad-accum", "one-micro-batch-read-once", "train.py", ("    for micro in range(cfg.grad_accum):\n        x, y = sampler.next_batch()\n",
                                                                   "    x, y = sampler.next_batch()\n    for micro in range(cfg.grad_accum):\n")),
    alternative("grad-accum", "losses-listed-then-averaged", edits=[
        ("    for micro in range(cfg.grad_accum):\n        x, y = sampler.next_batch()\n        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)\n        loss_sum += par.forward_backward(x, y, divisor=cfg.grad_accum, sync=micro == cfg.grad_accum - 1)\n    par.finish_gradient_sync()\n    loss = par.reduce_loss(loss_sum / cfg.grad_accum)\n",
         "    losses = []\n    for micro in range(cfg.grad_accum):\n        last = micro + 1 == cfg.grad_accum\n        x, y = (t.to(device) for t in sampler.next_batch())\n        losses.append(par.forward_backward(x, y, divisor=cfg.grad_accum, sync=last))\n    par.finish_gradient_sync()\n    loss = par.reduce_loss(sum(losses) / len(losses))\n")], file="train.py"),

    mutant("batch-sampler", "same-order-every-epoch", "data.py", ("perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)",
                                                                  "perm = np.random.default_rng(self.seed).permutation(self.n_windows)")),
    mutant("batch-sampler", "ranks-take-contiguous-blocks", "data.py", ("self._order = perm[self.rank::self.world_size][: self.windows_per_rank]",
                                                                        "self._order = perm[self.rank * self.windows_per_rank:(self.rank + 1) * self.windows_per_rank]")),
    mutant("batch-sampler", "window-of-t-tokens", "data.py", ("return self._maps[shard][start:start + self.block_size + 1]", "return self._maps[shard][start:start + self.block_size]")),
    mutant("batch-sampler", "windows-of-t-plus-1-apart", "data.py", ("start = (window - int(self.first_window[shard])) * self.block_size",
                                                                     "start = (window - int(self.first_window[shard])) * (self.block_size + 1)")),
    mutant("batch-sampler", "epoch-rolls-one-early", "data.py", ("if self.position == self.windows_per_rank:", "if self.position == self.windows_per_rank - 1:")),
    alternative("batch-sampler", "order-recomputed-and-shard-by-loop", edits=[
        ("        shard = int(np.searchsorted(self.first_window, window, side=\"right\")) - 1\n        if shard not in self._maps:",
         "        shard = 0\n        while self.first_window[shard + 1] <= window:\n            shard += 1\n        if shard not in self._maps:"),
        ("        window = int(self._epoch_order()[self.position])\n        self.position += 1\n        if self.position == self.windows_per_rank:\n            self.epoch, self.position = self.epoch + 1, 0\n        return window",
         "        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)\n        window = int(order[self.rank + self.position * self.world_size])\n        self.position = (self.position + 1) % self.windows_per_rank\n        self.epoch += self.position == 0\n        return window")], file="data.py"),

    mutant("checkpoint", "rng-not-restored", "train.py", ("    torch.set_rng_state(states[\"torch\"])\n", "    pass\n")),
    mutant("checkpoint", "rng-saved-from-a-fresh-generator", "train.py", ("states = {\"torch\": torch.get_rng_state()}", "states = {\"torch\": torch.Generator().get_state()}")),
    mutant("checkpoint", "optimizer-state-not-restored", "train.py", ("        else:\n            par.load_full_state(ckpt[\"model\"], ckpt[\"optimizer\"])\n        par.data_parallel.load_extra_state",
                                                                       "        else:\n            par.load_full_state(ckpt[\"model\"], None)\n        par.data_parallel.load_extra_state")),
    mutant("checkpoint", "data-position-not-restored", "train.py", ("        sampler.load_state_dict(reshard_sampler_state(ckpt[\"sampler\"], dp))\n", "")),
    mutant("checkpoint", "resumes-one-step-late", "train.py", ("    return ckpt[\"step\"]\n", "    return ckpt[\"step\"] + 1\n")),
    alternative("checkpoint", "cpu-rng-through-a-generator-copy", edits=[
            ("    states = {\"torch\": torch.get_rng_state()}", "    states = {\"torch\": torch.default_generator.get_state().clone()}"),
            ("    torch.set_rng_state(states[\"torch\"])", "    torch.default_generator.set_state(states[\"torch\"].clone())")], file="train.py"),

    # ------------------------------------------------------------------ kernels.py
    mutant("flash-attention", "old-sum-not-rescaled", "kernels.py", ("        l_i = l_i * alpha + tl.sum(p, 1)\n        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None]",
                                                                     "        l_i = l_i + tl.sum(p, 1)\n        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None]")),
    mutant("flash-attention", "old-output-not-rescaled", "kernels.py", ("acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # + P_tile V_tile",
                                                                        "acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)  # + P_tile V_tile")),
    mutant("flash-attention", "causal-mask-hides-the-diagonal", "kernels.py", ("                keep = keep & (offs_n[None, :] <= offs_m[:, None])\n            s = tl.where(keep, s, float(\"-inf\"))\n        m_new",
                                                                               "                keep = keep & (offs_n[None, :] < offs_m[:, None])\n            s = tl.where(keep, s, float(\"-inf\"))\n        m_new")),
    mutant("flash-attention", "natural-exp-on-log2-scores", "kernels.py", ("        alpha = tl.math.exp2(m_i - m_new)  # exp(m_{j-1} - m_j): re-bases the old sums\n        p = tl.math.exp2(s - m_new[:, None])",
                                                                           "        alpha = tl.exp(m_i - m_new)  # exp(m_{j-1} - m_j): re-bases the old sums\n        p = tl.exp(s - m_new[:, None])")),
    alternative("flash-attention", "natural-exp-and-separate-accumulate", edits=[
        ("        alpha = tl.math.exp2(m_i - m_new)  # exp(m_{j-1} - m_j): re-bases the old sums\n        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N), every entry in [0, 1]\n        l_i = l_i * alpha + tl.sum(p, 1)\n        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # + P_tile V_tile",
         "        alpha = tl.exp((m_i - m_new) * 0.6931471805599453)  # 2^x = e^(x ln 2)\n        p = tl.exp((s - m_new[:, None]) * 0.6931471805599453)\n        l_i = l_i * alpha + tl.sum(p, 1)\n        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)")], file="kernels.py"),

    mutant("flash-backward", "ds-without-delta", "kernels.py", ("ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - delta)", "ds_t = p_t * dp_t  # dS^T = P^T * (dP^T - delta)")),
    mutant("flash-backward", "lse-left-in-natural-log", "kernels.py", ("lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634  # log2 units",
                                                                       "lse = tl.load(LSE + offs_m, mask=offs_m < T, other=0.0)  # log2 units")),
    mutant("flash-backward", "dq-causal-mask-hides-the-diagonal", "kernels.py", ("                keep = keep & (offs_n[None, :] <= offs_m[:, None])\n            s = tl.where(keep, s, float(\"-inf\"))\n        p = tl.math.exp2(s - lse[:, None])",
                                                                                 "                keep = keep & (offs_n[None, :] < offs_m[:, None])\n            s = tl.where(keep, s, float(\"-inf\"))\n        p = tl.math.exp2(s - lse[:, None])")),
    mutant("flash-backward", "dq-from-values-not-keys", "kernels.py", ("dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)", "dq = tl.dot(ds.to(k.dtype), v, dq, input_precision=PRECISION)")),
    alternative("flash-backward", "softmax-jacobian-expanded", edits=[
        ("ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - delta)", "ds_t = p_t * dp_t - p_t * delta[None, :]"),
        ("        p = tl.math.exp2(s - lse[:, None])\n        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T\n        ds = p * (dp - delta[:, None])\n        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)",
         "        p = tl.exp((s - lse[:, None]) * 0.6931471805599453)\n        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])\n        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)")], file="kernels.py"),

    mutant("cross-entropy", "no-max-subtracted", "kernels.py", ("        base = tl.where(m_new == float(\"-inf\"), 0.0, m_new)\n", "        base = tl.where(m_new == float(\"-inf\"), 0.0, 0.0)\n")),
    mutant("cross-entropy", "loss-plus-the-target-logit", "kernels.py", ("lse - target_logit + z_coef", "lse + target_logit + z_coef")),
    mutant("cross-entropy", "gradient-without-the-one-hot", "kernels.py", ("* softmax_factor - tl.where(offs == target, 1.0, 0.0)", "* softmax_factor")),
    mutant("cross-entropy", "ignored-rows-still-get-gradients", "kernels.py", ("        grad = tl.where(valid, grad, 0.0)\n", "")),
    mutant("cross-entropy", "lse-in-log2-units", "kernels.py", ("lse = m_row + tl.math.log2(tl.sum(s * tl.math.exp2((m - m_row) * 1.4426950408889634), 0)) / 1.4426950408889634",
                                                                "lse = m_row + tl.math.log2(tl.sum(s * tl.math.exp2((m - m_row) * 1.4426950408889634), 0))")),
    alternative("cross-entropy", "max-pass-then-sum-pass", "kernels._ce_rows_kernel", """
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride_row
        target = tl.load(TARGETS + row)
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):  # pass 1: the row's maximum
            offs = start + tl.arange(0, BLOCK_V)
            m = tl.maximum(m, tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32))
        m_row = tl.max(m, 0)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):  # pass 2: sum of exp(x - max)
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            s += tl.exp(x - m_row)
        lse = m_row + tl.log(tl.sum(s, 0))
        valid = target != ignore_index
        target_logit = tl.load(ptr + target, mask=valid, other=0.0).to(tl.float32)
        tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
        for start in range(0, V, BLOCK_V):  # pass 3: softmax - onehot, in place
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            grad = tl.where(valid, tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0), 0.0)
            tl.store(ptr + offs, grad.to(LOGITS.dtype.element_ty), mask=offs < V)
    """),

    mutant("fused-ce-chunk", "weight-gradient-overwritten-per-chunk", "kernels.py", ("grad_w += grad_logits.t() @ x_chunk", "grad_w = grad_logits.t() @ x_chunk")),
    mutant("fused-ce-chunk", "mean-over-ignored-rows-too", "kernels.py", ("n_valid = (targets != ignore_index).sum()", "n_valid = targets.numel()")),
    mutant("fused-ce-chunk", "input-gradient-not-divided", "kernels.py", ("grad_x = (grad_x.float() / n_valid).to(x.dtype)", "grad_x = grad_x.float().to(x.dtype)")),
    mutant("fused-ce-chunk", "ragged-last-chunk-dropped", "kernels.py", ("    for start in range(0, N, chunk_size):\n        end = min(N, start + chunk_size)\n        x_chunk",
                                                                         "    for start in range(0, N - chunk_size + 1, chunk_size):\n        end = min(N, start + chunk_size)\n        x_chunk")),
    alternative("fused-ce-chunk", "einsum-products", edits=[
        ("grad_x[start:end] = grad_logits @ weight  # (n, V) x (V, C) -> (n, C)", "grad_x[start:end] = torch.einsum(\"nv,vc->nc\", grad_logits, weight)"),
        ("grad_w += grad_logits.t() @ x_chunk  # (V, n) x (n, C) -> (V, C), added in float32 in place", "grad_w += torch.einsum(\"nv,nc->vc\", grad_logits, x_chunk)")], file="kernels.py"),

    # ------------------------------------------------------------------ scaling.py
    mutant("chinchilla", "n-exponent-alpha-not-beta", "scaling.py", ("n = G * (compute / 6) ** (beta / (alpha + beta))", "n = G * (compute / 6) ** (alpha / (alpha + beta))"),
           ("d = (compute / 6) ** (alpha / (alpha + beta)) / G", "d = (compute / 6) ** (beta / (alpha + beta)) / G")),
    mutant("chinchilla", "forgets-the-6", "scaling.py", ("n = G * (compute / 6) ** (beta / (alpha + beta))", "n = G * compute ** (beta / (alpha + beta))"),
           ("d = (compute / 6) ** (alpha / (alpha + beta)) / G", "d = compute ** (alpha / (alpha + beta)) / G")),
    mutant("chinchilla", "g-inverted", "scaling.py", ("G = (alpha * law[\"A\"] / (beta * law[\"B\"])) ** (1 / (alpha + beta))", "G = (beta * law[\"B\"] / (alpha * law[\"A\"])) ** (1 / (alpha + beta))")),
    mutant("chinchilla", "g-without-the-exponents-weights", "scaling.py", ("G = (alpha * law[\"A\"] / (beta * law[\"B\"])) ** (1 / (alpha + beta))", "G = (law[\"A\"] / law[\"B\"]) ** (1 / (alpha + beta))")),
    alternative("chinchilla", "in-logs-then-d-from-the-constraint", "scaling.parametric_optimal", """
        check_positive(compute=compute)
        a, b = law["alpha"], law["beta"]
        # d/dN of A N^-a + B (C/6N)^-b = 0  =>  log N = (log(a A) - log(b B) + b log(C/6)) / (a + b)
        n = math.exp((math.log(a * law["A"]) - math.log(b * law["B"]) + b * math.log(compute / 6)) / (a + b))
        d = compute / (6 * n)
        return {"N": n, "D": d, "tokens_per_param": d / n, "loss": parametric_loss(n, d, law)}
    """),

    mutant("chinchilla-fit", "squared-loss-not-huber", "scaling.py", ("return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))", "return 0.5 * r**2")),
    mutant("chinchilla-fit", "huber-linear-part-not-shifted", "scaling.py", ("return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))", "return torch.where(r.abs() <= delta, 0.5 * r**2, delta * r.abs())")),
    mutant("chinchilla-fit", "sum-of-logs-not-log-of-sum", "scaling.py", ("pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)",
                                                                          "pred = torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]).sum(dim=0)")),
    mutant("chinchilla-fit", "irreducible-loss-dropped", "scaling.py", ("pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)",
                                                                        "pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD]), dim=0)")),
    mutant("chinchilla-fit", "exponent-sign-flipped", "scaling.py", ("pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)",
                                                                     "pred = torch.logsumexp(torch.stack([a + alpha * logN, b + beta * logD, e.expand_as(logN)]), dim=0)")),
    alternative("chinchilla-fit", "stable-log-of-the-sum-by-hand", edits=[
        ("pred = torch.logsumexp(torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)]), dim=0)",
         "terms = torch.stack([a - alpha * logN, b - beta * logD, e.expand_as(logN)])\n        top = terms.max(dim=0).values.detach()\n        pred = top + torch.log(torch.exp(terms - top).sum(dim=0))"),
        ("return torch.where(r.abs() <= delta, 0.5 * r**2, delta * (r.abs() - 0.5 * delta))",
         "small = r.abs().clamp(max=delta)  # the quadratic part, capped at delta\n    return 0.5 * small**2 + delta * (r.abs() - small)")], file="scaling.py"),

    mutant("isoflop-fit", "b-equal-to-a", "scaling.py", ("result.update(a=float(a), b=float(1 - a), k=float(np.exp(log_k)))", "result.update(a=float(a), b=float(a), k=float(np.exp(log_k)))")),
    mutant("isoflop-fit", "vertex-without-the-2", "scaling.py", ("x_opt = -c1 / (2 * c2)", "x_opt = -c1 / c2")),
    mutant("isoflop-fit", "edge-minima-kept", "scaling.py", ("        if best in (min(p[\"N\"] for p in pts), max(p[\"N\"] for p in pts)):", "        if False:")),
    mutant("isoflop-fit", "power-law-fit-in-linear-space", "scaling.py", ("a, log_k = np.polyfit(np.log([m[\"C\"] for m in good]), np.log([m[\"N_opt\"] for m in good]), 1)",
                                                                          "a, log_k = np.polyfit(np.array([m[\"C\"] for m in good]), np.array([m[\"N_opt\"] for m in good]), 1)")),
    alternative("isoflop-fit", "vertex-by-least-squares-by-hand", edits=[
        ("        c2, c1, c0 = np.polyfit(x, [p[\"loss\"] for p in pts], 2)",
         "        design = np.stack([x**2, x, np.ones_like(x)], axis=1)\n        c2, c1, c0 = np.linalg.lstsq(design, np.array([p[\"loss\"] for p in pts]), rcond=None)[0]")], file="scaling.py"),

    # ------------------------------------------------------------------ parallel.py
    mutant("data-parallel", "sum-not-mean", "parallel.py", ("            bucket.buffer /= n  # sum -> mean: the gradient of the mean loss over the global batch\n", "")),
    mutant("data-parallel", "sends-inside-no-sync", "parallel.py", ("        if not self.require_sync:\n            return\n        bucket, offset = self.slot[p]", "        bucket, offset = self.slot[p]")),
    mutant("data-parallel", "local-gradient-kept", "parallel.py", ("                else:\n                    p.grad.copy_(mean)\n", "")),
    mutant("data-parallel", "bucket-sent-one-gradient-early", "parallel.py", ("if bucket.ready == len(bucket.params):  # the bucket is full", "if bucket.ready == len(bucket.params) - 1:  # the bucket is full")),
    alternative("data-parallel", "scale-before-sending", edits=[
        ("        bucket.buffer[offset:offset + p.numel()].copy_(p.grad.reshape(-1))", "        bucket.buffer[offset:offset + p.numel()].copy_(p.grad.reshape(-1) / group_size(self.group))"),
        ("                    grad = p.grad.reshape(-1) if p.grad is not None else 0.0\n", "                    grad = p.grad.reshape(-1) / n if p.grad is not None else 0.0\n"),
        ("            bucket.buffer /= n  # sum -> mean: the gradient of the mean loss over the global batch\n", "")], file="parallel.py"),

    mutant("zero", "stage-1-not-averaged", "parallel.py", ("            self.full_grad = flat.div_(n)", "            self.full_grad = flat")),
    mutant("zero", "stage-2-not-averaged", "parallel.py", ("            unit.shard.grad = shard_grad.div_(n)", "            unit.shard.grad = shard_grad")),
    mutant("zero", "stage-1-takes-rank-0s-slice", "parallel.py", ("unit.shard.grad = self.full_grad[unit.rank * unit.shard_numel:(unit.rank + 1) * unit.shard_numel]",
                                                                  "unit.shard.grad = self.full_grad[:unit.shard_numel]")),
    mutant("zero", "updated-slices-not-gathered", "parallel.py", ("        self.optimizer.step()\n        all_gather(self.unit.full, self.unit.shard.detach(), self.unit.group, \"params\")", "        self.optimizer.step()")),
    alternative("zero", "stage-2-by-all-reduce-then-slice", edits=[
        ("            shard_grad = torch.empty(unit.shard_numel, dtype=flat.dtype, device=flat.device)\n            reduce_scatter(shard_grad, flat, unit.group, \"grads\")\n            unit.shard.grad = shard_grad.div_(n)",
         "            all_reduce(flat, unit.group, \"grads\")  # more traffic than a reduce-scatter, the same numbers\n            lo = unit.rank * unit.shard_numel\n            unit.shard.grad = (flat[lo:lo + unit.shard_numel] / n).clone()")], file="parallel.py"),

    mutant("zero3-gather", "gradient-summed-not-averaged", "parallel.py", ("        return grad_shard / n, None", "        return grad_shard, None")),
    mutant("zero3-gather", "own-gradient-slice-without-reducing", "parallel.py", ("        reduce_scatter(grad_shard, grad_full.contiguous(), ctx.group, \"grads\")\n",
                                                                                  "        r = dist.get_rank(ctx.group)\n        grad_shard.copy_(grad_full[r * grad_shard.numel():(r + 1) * grad_shard.numel()] * n)\n")),
    mutant("zero3-gather", "forward-repeats-its-own-shard", "parallel.py", ("        all_gather(full, shard, group, \"params\")\n        return full", "        full.copy_(shard.repeat(group_size(group)))\n        return full")),
    alternative("zero3-gather", "all-reduce-then-slice", edits=[
        ("        grad_shard = torch.empty(grad_full.numel() // n, dtype=grad_full.dtype, device=grad_full.device)\n        reduce_scatter(grad_shard, grad_full.contiguous(), ctx.group, \"grads\")\n        return grad_shard / n, None",
         "        total = grad_full.contiguous().clone()\n        all_reduce(total, ctx.group, \"grads\")\n        size = total.numel() // n\n        r = dist.get_rank(ctx.group)\n        return total[r * size:(r + 1) * size] / n, None")], file="parallel.py"),

    mutant("tensor-parallel", "f-backward-not-reduced", "parallel.py", ("        grad = grad.contiguous().clone()\n        all_reduce(grad, ctx.group, \"tp\")\n        return grad, None", "        return grad, None")),
    mutant("tensor-parallel", "g-forward-not-reduced", "parallel.py", ("        x = x.contiguous().clone()\n        all_reduce(x, group, \"tp\")\n        return x", "        return x.view_as(x)")),
    mutant("tensor-parallel", "g-backward-reduced-too", "parallel.py", ("        return grad, None\n\n\nclass ColumnParallelLinear", "        grad = grad.contiguous().clone()\n        all_reduce(grad, ctx.group, \"tp\")\n        return grad, None\n\n\nclass ColumnParallelLinear")),
    mutant("tensor-parallel", "f-backward-averaged", "parallel.py", ("        all_reduce(grad, ctx.group, \"tp\")\n        return grad, None", "        all_reduce(grad, ctx.group, \"tp\")\n        return grad / group_size(ctx.group), None")),
    alternative("tensor-parallel", "all-gather-then-sum", edits=[
        ("        x = x.contiguous().clone()\n        all_reduce(x, group, \"tp\")\n        return x",
         "        parts = [torch.empty_like(x) for _ in range(group_size(group))]\n        dist.all_gather(parts, x.contiguous(), group=group)\n        return torch.stack(parts).sum(dim=0)")], file="parallel.py"),

    mutant("vocab-parallel-ce", "no-max-subtracted", "parallel.py", ("    shifted = logits - max_logit.unsqueeze(-1)\n", "    shifted = logits\n    max_logit = torch.zeros_like(max_logit)\n")),
    mutant("vocab-parallel-ce", "max-not-shared-between-ranks", "parallel.py", ("    all_reduce(max_logit, group, \"tp\", op=dist.ReduceOp.MAX)\n", "")),
    mutant("vocab-parallel-ce", "target-logit-from-every-rank", "parallel.py", ("target_logit = ReduceFromTensorParallelRegion.apply(picked * mine, group)", "target_logit = ReduceFromTensorParallelRegion.apply(picked, group)")),
    mutant("vocab-parallel-ce", "ignored-positions-in-the-mean", "parallel.py", ("    return loss.sum() / valid.sum()", "    return loss.sum() / valid.numel()")),
    alternative("vocab-parallel-ce", "log-sum-exp-written-with-where", "parallel.vocab_parallel_cross_entropy", """
        logits = local_logits.to(torch.promote_types(local_logits.dtype, torch.float32))
        V_local = logits.size(-1)
        global_max = logits.detach().amax(dim=-1)
        all_reduce(global_max, group, "tp", op=dist.ReduceOp.MAX)
        sum_exp = ReduceFromTensorParallelRegion.apply(torch.exp(logits - global_max[..., None]).sum(dim=-1), group)
        lse = global_max + torch.log(sum_exp)
        local = targets - vocab_start
        owned = (local >= 0) & (local < V_local)
        picked = logits.gather(-1, local.clamp(0, V_local - 1)[..., None])[..., 0]
        target_logit = ReduceFromTensorParallelRegion.apply(torch.where(owned, picked, torch.zeros_like(picked)), group)
        valid = targets != -1
        return (lse - target_logit)[valid].mean()
    """),

    mutant("pipeline-1f1b", "newest-micro-batch-backward-first", "parallel.py", ("            grad_in = self.backward_step(*in_flight.popleft(), grad_out)", "            grad_in = self.backward_step(*in_flight.pop(), grad_out)")),
    mutant("pipeline-1f1b", "forward-of-the-wrong-micro-batch", "parallel.py", ("            inp, out = self.forward_step(warmup + j, received)", "            inp, out = self.forward_step(j, received)")),
    mutant("pipeline-1f1b", "first-activation-reused", "parallel.py", ("                received = self.send_backward_recv_forward(grad_in, shape)", "                self.send_backward_recv_forward(grad_in, shape)")),
    alternative("pipeline-1f1b", "list-and-counter", "parallel.Pipeline.one_f_one_b", """
        warmup = min(self.n - self.rank - 1, m)
        saved, done = [], 0
        for i in range(warmup):
            inp, out = self.forward_step(i, self.recv_forward(shape))
            self.send_forward(out)
            saved.append((i, inp, out))
        nxt = self.recv_forward(shape) if warmup < m else None
        for i in range(warmup, m):  # one forward, then the oldest micro-batch's backward
            inp, out = self.forward_step(i, nxt)
            saved.append((i, inp, out))
            grad_in = self.backward_step(*saved[done], self.send_forward_recv_backward(out, shape))
            saved[done], done = None, done + 1  # its activations can go
            if i + 1 < m:
                nxt = self.send_backward_recv_forward(grad_in, shape)
            else:
                self.send_backward(grad_in)
        while done < m:
            self.send_backward(self.backward_step(*saved[done], self.recv_backward(shape)))
            saved[done], done = None, done + 1
    """),

    mutant("ring-merge", "sum-not-rescaled", "parallel.py", ("                l = l * correction + p.sum(dim=-1)", "                l = l + p.sum(dim=-1)")),
    mutant("ring-merge", "output-not-rescaled", "parallel.py", ("                o = o * correction.unsqueeze(-1) + p @ kv[1]", "                o = o + p @ kv[1]")),
    mutant("ring-merge", "running-max-never-updated", "parallel.py", ("                m = m_new\n            for work in works:", "            for work in works:")),
    mutant("ring-merge", "block-exp-against-the-old-max", "parallel.py", ("                p = torch.exp(s - m_safe.unsqueeze(-1))", "                p = torch.exp(s - m.masked_fill(torch.isinf(m), 0.0).unsqueeze(-1))")),
    alternative("ring-merge", "einsum-and-where", edits=[
        ("                m_new = torch.maximum(m, s.amax(dim=-1))\n                m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)  # rows with no key yet: avoid inf - inf\n                correction = torch.exp(m - m_safe)  # rescale what was summed under the old max\n                p = torch.exp(s - m_safe.unsqueeze(-1))\n                l = l * correction + p.sum(dim=-1)\n                o = o * correction.unsqueeze(-1) + p @ kv[1]  # (B, nh, T, Tk) x (B, nh, Tk, hs)\n                m = m_new\n",
         "                m_new = torch.maximum(m, s.amax(dim=-1))\n                m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)\n                p = torch.exp(s - m_safe[..., None])\n                o = torch.exp(m - m_safe)[..., None] * o + torch.einsum(\"bhqk,bhkd->bhqd\", p, kv[1])\n                l = torch.exp(m - m_safe) * l + p.sum(dim=-1)\n                m = m_new\n")], file="parallel.py"),
]

# the fixed fast subset the test suite runs (the named mistakes, and alternatives)
FAST = {
    ("attention", "mask-off-by-one-sees-next"), ("attention", "no-1-over-sqrt-d"), ("rope", "interleaved-pairs"),
    ("adamw", "no-bias-correction"), ("grad-accum", "accumulated-not-divided"),
    ("attention", "max-subtracted-softmax-by-hand"), ("adamw", "bias-corrected-moments-written-out"),
}
