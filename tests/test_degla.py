"""DeGLA-style terms against dense formulas (1 and 2 gloo ranks), the EMA teacher, and the term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcontrast.config import ConfigError, LossConfig, TermConfig, load_config
from mmcontrast.losses import Objective
from mmcontrast.losses.degla import distillation, image_grounded_contrast, text_grounded_contrast
from mmcontrast.train.ema import WeightEma
from tests.distributed import run_ranks


def _inputs(n=9, k=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    x = {
        "image": unit(n, d),
        "text": unit(n, d),
        "negatives": unit(n, k, d),
        "teacher_image": unit(n, d),
        "teacher_text": unit(n, d),
        "teacher_negatives": unit(n, k, d),
    }
    valid = torch.rand(n, generator=g) > 0.2
    negatives_valid = torch.rand(n, k, generator=g) > 0.4
    negatives_valid[1] = False  # a sample without negatives is not counted by the contrasts
    return x, valid, negatives_valid


def _dense(x, valid, negatives_valid, scale):
    """Per-sample loops, the plainest statement of each formula."""
    ig, tg, counted = [], [], []
    for i in range(len(valid)):
        if not (valid[i] and negatives_valid[i].any()):
            continue
        negs = x["negatives"][i][negatives_valid[i]]
        tnegs = x["teacher_negatives"][i][negatives_valid[i]]
        logits = scale * torch.cat([(x["image"][i] @ x["text"][i])[None], negs @ x["image"][i]])
        ig.append(-torch.log_softmax(logits, 0)[0])
        logits = scale * torch.cat([(x["text"][i] @ x["teacher_text"][i])[None], tnegs @ x["text"][i]])
        tg.append(-torch.log_softmax(logits, 0)[0])
        counted.append(i)
    cos = F.cosine_similarity(x["image"][valid], x["teacher_image"][valid], dim=-1)
    return torch.stack(ig).mean(), torch.stack(tg).mean(), (1 - cos).mean()


def _ours(x, valid, negatives_valid, scale):
    return (
        image_grounded_contrast(
            x["image"], x["text"], x["negatives"], scale, valid=valid, negatives_valid=negatives_valid
        ),
        text_grounded_contrast(
            x["text"],
            x["teacher_text"],
            x["teacher_negatives"],
            scale,
            valid=valid,
            negatives_valid=negatives_valid,
        ),
        distillation(x["image"], x["teacher_image"], valid=valid),
    )


def _grads(fn, x, valid, negatives_valid, scale=12.0):
    leaves = {k: v.clone().requires_grad_(k in ("image", "text", "negatives")) for k, v in x.items()}
    values = fn(leaves, valid, negatives_valid, torch.tensor(scale))
    sum(values).backward()
    return [v.detach() for v in values], {k: leaves[k].grad for k in ("image", "text", "negatives")}


def test_equal_dense_formulas():
    x, valid, nv = _inputs()
    ours, ours_g = _grads(_ours, x, valid, nv)
    ref, ref_g = _grads(_dense, x, valid, nv)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ours_g:
        torch.testing.assert_close(ours_g[k], ref_g[k], rtol=1e-4, atol=1e-6)


def test_terms_make_no_host_read():
    """Meta tensors have no values, so a mask's bool(), nonzero() or boolean indexing raises."""
    x, valid, nv = _inputs()
    meta = {k: v.to("meta").requires_grad_(k in ("image", "text", "negatives")) for k, v in x.items()}
    values = _ours(meta, valid.to("meta"), nv.to("meta"), torch.tensor(12.0, device="meta"))
    sum(values).backward()
    assert meta["image"].grad.device.type == "meta"


def test_no_counted_sample_gives_zero_with_a_graph():
    x, valid, nv = _inputs()
    values, grads = _grads(_ours, x, torch.zeros_like(valid), nv)
    assert all(v == 0 for v in values) and all(g is not None and not g.any() for g in grads.values())


def _rank_fn(rank, world, sizes):
    x, valid, nv = _inputs(n=sum(sizes))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local = {k: v[rows] for k, v in x.items()}
    return _grads(_ours, local, valid[rows], nv[rows])


def test_two_gloo_ranks_equal_dense_formulas():
    sizes = (4, 5)
    ranks = run_ranks(2, _rank_fn, sizes)
    x, valid, nv = _inputs(n=9)
    ref, ref_g = _grads(_dense, x, valid, nv)
    for i in range(3):
        torch.testing.assert_close(sum(r[0][i] for r in ranks) / 2, ref[i], rtol=1e-5, atol=1e-6)
    for k in ref_g:
        torch.testing.assert_close(torch.cat([r[1][k] for r in ranks]) / 2, ref_g[k], rtol=1e-4, atol=1e-6)


def test_ema_teacher_follows_the_student_and_is_frozen():
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    student[0].bias.requires_grad_(False)  # a locked parameter: the average keeps it
    teacher = WeightEma(student, decay=0.9, every=2)
    before = teacher.model[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(3.0)
    teacher.update(student, step=1)  # not an update step (every=2): nothing moves
    assert torch.equal(teacher.model[0].weight, before)
    teacher.update(student, step=2)
    torch.testing.assert_close(teacher.model[0].weight, 0.9 * before + 0.1 * student[0].weight)
    assert torch.equal(teacher.model[0].bias, student[0].bias)
    assert torch.equal(teacher.model[1].running_mean, student[1].running_mean)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    clone = WeightEma(student, decay=0.9)
    clone.load_state_dict(teacher.state_dict())
    assert torch.equal(clone.model[0].weight, teacher.model[0].weight)


def test_degla_term_weights_its_parts_and_needs_a_teacher():
    x, valid, nv = _inputs()
    objective = Objective.from_config(
        LossConfig([TermConfig("degla", 2.0, [["image", "text"]], {"distill": 0.5, "ema": 0.99})]),
        ["image", "text"],
    )
    assert objective.teacher_decay == 0.99
    emb = {
        "image": x["image"],
        "text": x["text"],
        "text_negatives": x["negatives"],
        "teacher": {
            "image": x["teacher_image"],
            "text": x["teacher_text"],
            "text_negatives": x["teacher_negatives"],
        },
    }
    present = {"image": valid, "text": valid, "text_negatives": nv}
    total, parts = objective(emb, present, torch.tensor(12.0))
    ig, tg, _ = _ours(x, valid, nv, torch.tensor(12.0))
    distill = 0.5 * (
        distillation(x["image"], x["teacher_image"], valid=valid)
        + distillation(x["text"], x["teacher_text"], valid=valid)
    )
    torch.testing.assert_close(parts["degla/image_grounded"], ig)
    torch.testing.assert_close(total, 2.0 * (ig + tg + 0.5 * distill))
    with pytest.raises(ValueError, match="teacher"):
        objective({k: v for k, v in emb.items() if k != "teacher"}, present, torch.tensor(12.0))


def test_config_refuses_negative_terms_without_negatives(repo_root):
    with pytest.raises(ConfigError, match="data.negatives"):
        load_config(repo_root / "configs/demo.yaml", ["loss.terms=[{name: negclip, pairs: [[image, text]]}]"])
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(
            repo_root / "configs/demo-negatives.yaml",
            ["loss.terms=[{name: degla, pairs: [[image, text]]}]", "train.zero_stage=3"],
        )
