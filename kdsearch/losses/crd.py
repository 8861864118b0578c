"""CRD: Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.losses.base import BuildContext, Step, Term


class Embed(nn.Module):
    """Linear projection to the contrastive space, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # fp32: anchors and memories alike
            return F.normalize(self.linear(x.flatten(1).float()), dim=1)


def contrast_loss(log_scores: Tensor, num_data: int) -> Tensor:
    """NCE loss of CRD (its eq. 18 as implemented): column 0 holds the log of the positive's
    score, the other K columns the negatives'; the noise distribution is uniform over the
    `num_data` images. With P a score and n = K / num_data, the official code takes
    log(P / (P + n)) and log(n / (P + n)); in logs these are -softplus(log n - log P) and
    -softplus(log P - log n), which hold for any temperature (the official form's exp(1 / T)
    is inf in fp32 below T = 0.0113, and every loss NaN)."""
    k = log_scores.shape[1] - 1
    log_noise = math.log(k / num_data)
    pos, neg = log_scores[:, 0], log_scores[:, 1:]
    log_d1 = -F.softplus(log_noise - pos)
    log_d0 = -F.softplus(neg - log_noise)
    return -(log_d1.sum() + log_d0.sum()) / log_scores.shape[0]


class NegativeSampler(nn.Module):
    """Draws negatives for each anchor uniformly from the images of *other* classes (the official
    sampler uses the labels this way). Training images are kept sorted by class, so the other
    classes of class c are two contiguous runs and a draw is two additions and a lookup."""

    order: Tensor
    counts: Tensor
    starts: Tensor

    def __init__(self, labels: Tensor) -> None:
        super().__init__()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise ValueError("contrastive negatives need at least two classes in the training set")
        self.register_buffer("order", order)
        self.register_buffer("counts", counts)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts)

    def forward(self, y: Tensor, k: int, gen: torch.Generator) -> Tensor:
        others = len(self.order) - self.counts[y]
        u = (torch.rand(len(y), k, generator=gen, device=y.device) * others[:, None]).long()
        u = torch.minimum(u, others[:, None] - 1)
        after = (u >= self.starts[y][:, None]).long() * self.counts[y][:, None]
        return self.order[u + after]


class ContrastMemory(nn.Module):
    """Momentum memory banks of student and teacher embeddings for every training image, and the
    normalising constants Z (kept as logs), fixed on the first batch as the official code does."""

    bank_s: Tensor
    bank_t: Tensor
    log_z: Tensor

    def __init__(self, num_data: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("bank_s", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("bank_t", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("log_z", torch.full((2,), math.nan))  # NaN: not set yet
        self._z_fixed = False  # spares a device sync per step once Z is known
        self._pending: tuple[Tensor, Tensor, Tensor, float] | None = None

    def scores(
        self, v_s: Tensor, v_t: Tensor, rows: Tensor, temperature: float
    ) -> tuple[Tensor, Tensor]:
        """log(exp(<memory, anchor> / T) / Z): the student anchor against teacher memories, and
        the teacher anchor against student memories, at `rows` (B, K+1; positive first). Z is
        the mean of exp(<memory, anchor> / T) over the first batch times the number of images.

        The official code gathers the K+1 memories of each anchor (B x K x D floats, 0.5 GB per
        bank at B = 64, K = 16384) and contracts them; one matrix product with the whole bank
        (B x N) and a gather of the scores gives the same numbers at a fraction of the memory
        traffic. Computed in fp32 even under autocast: 1 / 0.07 does not survive bf16.
        """
        self._apply_pending()
        with torch.autocast(v_s.device.type, enabled=False):
            logit_s = (v_s.float() @ self.bank_t.T).gather(1, rows) / temperature
            logit_t = (v_t.float() @ self.bank_s.T).gather(1, rows) / temperature
        if not self._z_fixed:
            if self.log_z[0].isnan():
                mean = torch.stack([logit_s.flatten(), logit_t.flatten()]).logsumexp(1)
                self.log_z.copy_(mean.detach() - math.log(logit_s.numel()))
                self.log_z.add_(math.log(self.bank_s.shape[0]))
            self._z_fixed = True
        return logit_s - self.log_z[0], logit_t - self.log_z[1]

    def update(self, v_s: Tensor, v_t: Tensor, idx: Tensor, momentum: float) -> None:
        """Move the positives' memories toward this batch's embeddings.

        The write is held until the next `scores` call: this step's backward still reads the
        banks (the matrix product saved them), and the next step is the first to read the new
        memories, exactly as when the official code writes them at once.
        """
        self._pending = (v_s.detach(), v_t.detach(), idx, momentum)

    @torch.no_grad()
    def _apply_pending(self) -> None:
        if self._pending is None:
            return
        v_s, v_t, idx, momentum = self._pending
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            bank[idx] = F.normalize(bank[idx] * momentum + v * (1 - momentum), dim=1)
        self._pending = None


class ContrastiveLayer(nn.Module):
    """One CRD objective between a student tensor and a teacher tensor: two embeddings, memory
    banks over the training set, negatives from other classes."""

    def __init__(
        self,
        dim_s: int,
        dim_t: int,
        ctx: BuildContext,
        *,
        feat_dim: int,
        temperature: float,
        negatives: int,
        momentum: float,
    ) -> None:
        super().__init__()
        self.embed_s = Embed(dim_s, feat_dim)
        self.embed_t = Embed(dim_t, feat_dim)
        self.memory = ContrastMemory(ctx.num_train, feat_dim)
        self.sampler = NegativeSampler(ctx.train_labels.cpu())
        self.temperature = temperature
        self.negatives = negatives
        self.momentum = momentum

    def forward(self, f_s: Tensor, f_t: Tensor, step: Step) -> Tensor:
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        idx = step.batch.idx
        rows = step.memo(("contrast rows", self.negatives), lambda: self._rows(step))
        log_s, log_t = self.memory.scores(v_s, v_t, rows, self.temperature)
        num_data = int(self.memory.bank_s.shape[0])
        loss = contrast_loss(log_s, num_data) + contrast_loss(log_t, num_data)
        self.memory.update(v_s, v_t, idx, self.momentum)
        return loss

    def _rows(self, step: Step) -> Tensor:
        """Each anchor's own index, then its negatives; shared by every contrastive layer of a
        step, as the official data loader draws one sample per image for all of them."""
        idx = step.batch.idx
        gen = torch.Generator(device=idx.device).manual_seed(step.seed)
        return torch.cat([idx[:, None], self.sampler(step.y, self.negatives, gen)], dim=1)


class CRD(Term):
    """Contrast the student's pooled features against the teacher's: the same image is the
    positive, K images of other classes the negatives."""

    def __init__(
        self,
        ctx: BuildContext,
        *,
        feat_dim: int = 128,
        temperature: float = 0.07,
        negatives: int = 16384,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        assert ctx.teacher is not None
        self.layer = ContrastiveLayer(
            ctx.student.feat_dim,
            ctx.teacher.feat_dim,
            ctx,
            feat_dim=feat_dim,
            temperature=temperature,
            negatives=negatives,
            momentum=momentum,
        )

    def forward(self, step: Step) -> Tensor:
        loss: Tensor = self.layer(step.s.pooled, step.t.pooled, step)
        return loss
