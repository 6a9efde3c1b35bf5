import math

import pytest
import timm
import torch
from safetensors.torch import load_file

import wecolora.train.distill as distill_module
from wecolora.config import DistillConfig
from wecolora.errors import UserError
from wecolora.method.adapters import split_qkv
from wecolora.method.student import build_student
from wecolora.runtime import make_scheduler
from wecolora.teachers.load import load_model
from wecolora.train.distill import distill

from conftest import interrupted_after_first_checkpoint


def config(teacher_dir, output, **overrides):
    settings = dict(teacher=f"local-dir:{teacher_dir}", data="mnist-5k", output=str(output), ratio=0.02,
                    epochs=3, warmup_epochs=1, batch_size=16, accum_steps=2, blr=5e-3, num_workers=0, device="cpu")
    settings.update(overrides)
    return DistillConfig(**settings)


def test_scheduler_warmup_from_zero_then_cosine_to_zero_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=4e-3)
    epochs, warmup, per_epoch = 5, 2, 4
    scheduler = make_scheduler(optimizer, epochs, warmup, per_epoch)
    warmup_steps, total = warmup * per_epoch, epochs * per_epoch
    for step in range(total + 1):
        scheduler.step_update(step)
        if step < warmup_steps:
            expected = 4e-3 * step / warmup_steps
        else:
            expected = 0.5 * 4e-3 * (1 + math.cos(math.pi * (step - warmup_steps) / (total - warmup_steps)))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mode", ["wecolora", "lora-qv", "weco-kd", "scratch-kd"])
def test_a_short_distillation_lowers_the_loss_in_every_mode(teacher_dir, tmp_path, mode):
    result = distill(config(teacher_dir, tmp_path / mode, mode=mode, epochs=4, rank=8))
    losses = [row["loss"] for row in result["epochs"]]
    assert losses[-1] < losses[0], losses
    for name in ("student/config.json", "student/model.safetensors", "adapter/wecolora.json", "config.yaml",
                 "summary.csv", "subset.txt"):
        assert (tmp_path / mode / name).is_file(), name
    assert not (tmp_path / mode / "checkpoint").exists()
    assert len((tmp_path / mode / "subset.txt").read_text().split()) == 80  # 2% of 400 per class x 10
    assert (tmp_path / mode / "summary.csv").read_text().count("\n") == 1 + 4


def test_exported_student_loads_in_timm_and_matches_the_adapter_files(teacher_dir, tmp_path):
    run = tmp_path / "run"
    distill(config(teacher_dir, run, rank=4))
    plain = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True).eval()
    assert len(plain.blocks) == 3
    # Rebuild the adapter student from the teacher and the saved peft adapter.
    from peft import PeftModel

    teacher = load_model(f"local-dir:{teacher_dir}")
    base = build_student(teacher, 2, mode="weco-kd")
    split_qkv(base)
    student = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    images = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(images), student(images), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(images), teacher(images), atol=1e-3)  # training changed something


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(teacher_dir, tmp_path, monkeypatch):
    distill(config(teacher_dir, tmp_path / "whole"))

    with interrupted_after_first_checkpoint(monkeypatch, distill_module):
        distill(config(teacher_dir, tmp_path / "cut"))
    assert (tmp_path / "cut" / "checkpoint").is_dir()
    with pytest.raises(UserError, match="interrupted run"):
        distill(config(teacher_dir, tmp_path / "cut"))
    with pytest.raises(UserError, match=r"other settings \(--ratio 0.02 -> 0.05"):
        distill(config(teacher_dir, tmp_path / "cut", resume="auto", ratio=0.05))
    result = distill(config(teacher_dir, tmp_path / "cut", resume="auto"))
    assert [row["epoch"] for row in result["epochs"]] == [1, 2, 3]

    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(whole[key], resumed[key], atol=1e-6, rtol=0)


def test_a_finished_run_is_not_overwritten_without_asking(teacher_dir, tmp_path):
    distill(config(teacher_dir, tmp_path / "run", epochs=2))
    before = (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a finished run"):
        distill(config(teacher_dir, tmp_path / "run", epochs=2, seed=1))
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() == before
    distill(config(teacher_dir, tmp_path / "run", epochs=2, seed=1, overwrite=True))
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() != before


def test_per_block_matching_pairs_student_blocks_with_the_ends_of_their_groups(teacher_dir, tmp_path):
    distill(config(teacher_dir, tmp_path / "run", reduction=3, match="per-block", epochs=2))
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert "matched_teacher_blocks:\n  - 2\n  - 5\n" in text



def planted_clusters(folder, per_cluster=10):
    """An unlabeled folder of 28x28 images in 4 planted clusters (dark, light, left half, top half, each with
    noise), named so that sorting them mixes the clusters; returns {file name: cluster}."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    bases = [np.zeros((28, 28)), np.full((28, 28), 255.0), np.zeros((28, 28)), np.zeros((28, 28))]
    bases[2][:, :14] = 255
    bases[3][:14, :] = 255
    names = {}
    for i in range(4 * per_cluster):
        cluster = i % 4
        image = np.clip(bases[cluster] + rng.normal(0, 8, (28, 28)), 0, 255).astype(np.uint8)
        name = f"img{rng.integers(10 ** 6):06d}-{i}.png"
        Image.fromarray(image).save(folder / name)
        names[name] = cluster
    return names


def test_a_coreset_of_an_unlabeled_folder_covers_every_cluster_and_a_resume_reuses_its_manifest(
        teacher_dir, tmp_path, monkeypatch):
    import json

    import wecolora.data.subset as subset_module

    names = planted_clusters(tmp_path / "photos")
    settings = dict(data=str(tmp_path / "photos"), subset="coreset", images=4, epochs=2, batch_size=4, accum_steps=1)
    distill(config(teacher_dir, tmp_path / "whole", **settings))
    manifest = json.loads((tmp_path / "whole" / "subset.json").read_text())
    assert sorted(names[key] for key in manifest["keys"]) == [0, 1, 2, 3]  # one image of every cluster
    assert manifest["rule"] == "coreset" and manifest["source"]["kind"] == "folder" and manifest["labeled"] is False
    assert manifest["pool"] == 40 and manifest["method"] == "kcenter"
    assert (tmp_path / "whole" / "subset.txt").read_text().split() == manifest["keys"]
    assert "rule: coreset" in (tmp_path / "whole" / "config.yaml").read_text()

    with interrupted_after_first_checkpoint(monkeypatch, distill_module):
        distill(config(teacher_dir, tmp_path / "cut", **settings))
    assert json.loads((tmp_path / "cut" / "subset.json").read_text())["keys"] == manifest["keys"]
    # The resumed run takes the manifest's images: no coreset pick (nor its features) runs again.
    monkeypatch.setitem(subset_module.CORESET_PICKS, "kcenter", lambda *a: pytest.fail("picked again"))
    distill(config(teacher_dir, tmp_path / "cut", resume="auto", **settings))
    assert (tmp_path / "cut" / "subset.txt").read_text().split() == manifest["keys"]
    assert "from_manifest: true" in (tmp_path / "cut" / "config.yaml").read_text()


def test_per_class_on_an_unlabeled_folder_is_refused_before_the_teacher_loads(teacher_dir, tmp_path, monkeypatch):
    planted_clusters(tmp_path / "photos", per_cluster=2)
    monkeypatch.setattr(distill_module, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(UserError, match="--subset per-class needs labels, and .*photos is unlabeled"):
        distill(config(teacher_dir, tmp_path / "run", data=str(tmp_path / "photos"), subset="per-class"))
@pytest.mark.parametrize("width_loss, ranking", [("kept", "activation"), ("projection", "uniform")])
def test_a_narrow_student_distills_and_exports_a_plain_timm_vit(teacher_dir, tmp_path, width_loss, ranking):
    import json

    import yaml

    run = tmp_path / "run"
    result = distill(config(teacher_dir, run, epochs=4, rank=4, embed_dim=16, mlp_hidden=48, width_loss=width_loss,
                            width_ranking=ranking))
    losses = [row["loss"] for row in result["epochs"]]
    assert losses[-1] < losses[0], losses
    plain = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True).eval()  # timm alone
    assert (plain.embed_dim, plain.blocks[0].attn.num_heads, plain.blocks[0].mlp.fc1.out_features, len(plain.blocks)) \
        == (16, 2, 48, 3)
    assert "width_projector" not in str(list(load_file(str(run / "student" / "model.safetensors"))))  # dropped
    info = json.loads((run / "adapter" / "wecolora.json").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    for record in (info, resolved):
        assert (record["embed_dim"], record["heads"], record["mlp_hidden"]) == (16, 2, 48)
        assert record["width_selection"]["ranking"] == ranking
        assert len(record["width_selection"]["channels"]) == 16
        assert [len(n) for n in record["width_selection"]["neurons"]] == [48, 48, 48]


def test_a_resumed_narrow_run_with_the_projection_ends_with_the_same_weights(teacher_dir, tmp_path, monkeypatch):
    narrow = dict(embed_dim=16, width_loss="projection", rank=4)
    distill(config(teacher_dir, tmp_path / "whole", **narrow))
    with interrupted_after_first_checkpoint(monkeypatch, distill_module):
        distill(config(teacher_dir, tmp_path / "cut", **narrow))
    saved = load_file(str(tmp_path / "cut" / "checkpoint" / "trainable.safetensors"))
    assert any(key.startswith("width_projector.") for key in saved)  # the projector is checkpointed with the adapters
    distill(config(teacher_dir, tmp_path / "cut", resume="auto", **narrow))
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(whole[key], resumed[key], atol=1e-6, rtol=0)
