"""MAE pre-training (mae.py), batched device augmentation (augment.py) and the ``bundled-mae`` teacher spec."""
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import wecolora.train.pretrain as pretrain_module
from wecolora.cli import main
from wecolora.data.augment import DeviceCropLoader, resize_normalize, sample_crop_boxes, stream_seed
from wecolora.data.transforms import eval_transform
from wecolora.errors import UserError
from wecolora.teachers import specs
from wecolora.teachers.load import load_model
from wecolora.train import run_folder
from wecolora.train.mae import (
    MaskedAutoencoder,
    encode,
    patchify,
    random_masking,
    reconstruction_loss,
    sincos_pos_embed,
)
from wecolora.train.pretrain import PretrainConfig, pretrain

from conftest import interrupted_after_first_checkpoint, probe_on_fixed_fashion_slice, tiny_vit

# ---------------------------------------------------------------- masking

MASKING_CASES = [  # (num_patches, mask_ratio, kept per image)
    (16, 0.75, 4),
    (196, 0.75, 49),
    (16, 0.5, 8),
    (10, 0.33, 7),  # round(6.7): the kept count rounds, it does not truncate
]


@pytest.mark.parametrize("num_patches, ratio, kept", MASKING_CASES)
def test_masking_keeps_exactly_the_unmasked_share_of_every_image(num_patches, ratio, kept):
    keep, mask = random_masking(64, num_patches, ratio, torch.Generator().manual_seed(0))
    assert keep.shape == (64, kept)
    assert (mask.sum(dim=1) == num_patches - kept).all()
    assert not mask.gather(1, keep).any()  # the kept patches are exactly the unmasked ones
    assert (keep.sort(dim=1).values.diff(dim=1) > 0).all()  # no patch kept twice


def test_masking_is_seeded_and_differs_between_images_and_seeds():
    first = random_masking(32, 16, 0.75, torch.Generator().manual_seed(3))
    again = random_masking(32, 16, 0.75, torch.Generator().manual_seed(3))
    other = random_masking(32, 16, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert len({tuple(row.tolist()) for row in first[1]}) > 20  # each image draws its own mask


@pytest.mark.parametrize("ratio", [0.99, 0.01])
def test_a_ratio_leaving_nothing_to_see_or_to_predict_is_refused(ratio):
    with pytest.raises(UserError, match="--mask-ratio"):
        random_masking(2, 16, ratio)


# ---------------------------------------------------------------- encoder

ENCODER_CASES = {  # timm layouts the encoder handles
    "cls": {},
    "no-embed-class": {"no_embed_class": True},
    "register-tokens": {"reg_tokens": 2},
    "register-tokens-no-embed-class": {"reg_tokens": 2, "no_embed_class": True},
}


@pytest.mark.parametrize("overrides", ENCODER_CASES.values(), ids=ENCODER_CASES.keys())
def test_the_encoder_on_every_patch_in_order_is_timms_forward_features(overrides):
    model = tiny_vit(depth=2, num_classes=0, **overrides)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model.forward_features(images)
        torch.testing.assert_close(encode(model, images), expected, atol=1e-5, rtol=0)
        # All patches in a shuffled order: attention does not care, so each token comes out permuted alike.
        order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
        shuffled = encode(model, images, keep=order)
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(shuffled[:, :prefix], expected[:, :prefix], atol=1e-5, rtol=0)
    permuted = expected[:, prefix:].gather(1, order[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(shuffled[:, prefix:], permuted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides, message", [
    ({"class_token": False, "global_pool": "avg"}, "no class token"),
    ({"dynamic_img_size": True}, "fixed image size"),
    ({"patch_drop_rate": 0.5}, "patch_drop_rate"),
])
def test_layouts_the_encoder_cannot_mask_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        MaskedAutoencoder(tiny_vit(depth=1, num_classes=0, **overrides), decoder_dim=32, decoder_depth=1)


def test_patchify_puts_each_patch_row_by_row_with_channels_last():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(images, 2)  # [2, 4, 12]
    assert patches.shape == (2, 4, 12)
    # patch 1 is the top-right 2x2 block; its first pixel (row 0, column 2) in channels 0, 1, 2
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 2].item() for c in range(3)]
    assert patches[1, 2, 3:6].tolist() == [images[1, c, 2, 1].item() for c in range(3)]  # row 2, column 1


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("norm_pix", [True, False])
def test_the_loss_counts_only_the_masked_patches(norm_pix):
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 16, 12, generator=generator), torch.randn(2, 16, 12, generator=generator)
    _, mask = random_masking(2, 16, 0.75, generator)
    loss = reconstruction_loss(prediction, target, mask, norm_pix=norm_pix)
    visible, hidden = (~mask[0]).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    changed = target.clone()
    changed[0, visible] += torch.randn(12, generator=generator) * 5
    assert reconstruction_loss(prediction, changed, mask, norm_pix=norm_pix) == loss
    changed[0, hidden] += torch.randn(12, generator=generator) * 5
    assert reconstruction_loss(prediction, changed, mask, norm_pix=norm_pix) != loss


def test_norm_pix_loss_ignores_each_patchs_brightness_and_contrast():
    target = torch.randn(1, 4, 12)
    mask = torch.tensor([[True, True, False, True]])
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert reconstruction_loss(normalised, target * 3 + 7, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert reconstruction_loss(normalised, target * 3 + 7, mask, norm_pix=False) > 1


def test_the_decoder_learns_from_the_masked_patches_through_the_mask_token():
    model = MaskedAutoencoder(tiny_vit(depth=1, num_classes=0), decoder_dim=32, decoder_depth=1)
    model(torch.randn(4, 3, 16, 16), torch.Generator().manual_seed(0))["loss"].backward()
    for name in ("decoder.mask_token", "decoder.embed.weight", "encoder.cls_token", "encoder.pos_embed",
                 "encoder.blocks.0.attn.qkv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert "decoder.pos_embed" not in dict(model.named_parameters())  # fixed sin-cos, not learned


def test_tokens_and_position_embeddings_get_no_weight_decay():
    from timm.optim import create_optimizer_v2

    model = MaskedAutoencoder(tiny_vit(depth=1, num_classes=0), decoder_dim=32, decoder_depth=1)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0
                 for p in group["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "decoder.mask_token", "decoder.norm.weight"} <= undecayed
    assert "encoder.blocks.0.attn.qkv.weight" not in undecayed and "decoder.pred.weight" not in undecayed


def test_sincos_positions_are_distinct_and_bounded():
    pos = sincos_pos_embed((4, 4), 32)
    assert pos.shape == (16, 32) and pos.abs().max() <= 1
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0.1  # no two positions alike


# ---------------------------------------------------------------- device augmentation


def test_crop_boxes_are_seeded_inside_the_image_and_within_the_area_range():
    boxes = sample_crop_boxes(5000, 28, 20, generator=torch.Generator().manual_seed(0))
    again = sample_crop_boxes(5000, 28, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 20).all()
    area = h * w / (28 * 20)
    assert area.min() >= 0.15 and area.max() <= 1.0  # 0.2-1 up to the rounding of h and w
    aspect = w / h
    assert aspect.min() >= 0.6 and aspect.max() <= 1.6  # 3/4-4/3 up to the rounding of small boxes
    assert area.std() > 0.15 and top.unique().numel() > 5  # actually random


def test_the_device_loader_serves_each_image_at_most_once_per_epoch_normalised():
    # Image i is flat grey i: any crop or flip of it stays flat, so each batch row says which image it is.
    images = torch.arange(200, dtype=torch.uint8)[:, None, None].expand(200, 8, 8).contiguous()
    loader = DeviceCropLoader(images, batch_size=16, size=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    loader.set_seed(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 12 and batches[0].shape == (16, 3, 8, 8)
    seen = torch.cat([(b[:, 0].mean((1, 2)) * 0.25 + 0.5) * 255 for b in batches]).round().long()
    assert seen.unique().numel() == 12 * 16
    loader.set_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(batches, loader))  # seeded
    shards = [DeviceCropLoader(images, batch_size=8, size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                                       num_processes=2, process_index=i) for i in range(2)]
    for shard in shards:
        shard.set_seed(0)
    rows = [torch.cat([(b[:, 0].mean((1, 2)) * 0.25 + 0.5) * 255 for b in s]).round().long() for s in shards]
    assert len(shards[0]) == 12 and not set(rows[0].tolist()) & set(rows[1].tolist())  # disjoint shares


def test_stream_seeds_differ_for_every_key():
    seeds = {stream_seed(seed, epoch, stream) for seed in range(3) for epoch in range(3) for stream in range(2)}
    assert len(seeds) == 18 and all(0 <= s < 2 ** 63 for s in seeds)


# ---------------------------------------------------------------- pretrain --objective mae


def mae_config(output, **overrides) -> PretrainConfig:
    settings = dict(data="mnist-5k", output=str(output), objective="mae", depth=1, embed_dim=32, num_heads=2,
                    decoder_dim=32, decoder_depth=1, epochs=2, warmup_epochs=1, batch_size=1024, eval_every=2,
                    num_workers=0, device="cpu")
    return PretrainConfig(**{**settings, **overrides})


def test_mae_pretraining_writes_a_headless_encoder_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain_module, "KNN_TRAIN", 1000)  # a smaller monitor: this test is about the run
    monkeypatch.setattr(pretrain_module, "KNN_TEST", 500)
    whole = pretrain(mae_config(tmp_path / "whole"))
    assert [row["epoch"] for row in whole["epochs"]] == [1, 2] and 0.2 < whole["knn_top1"] <= 1
    assert (tmp_path / "whole" / "summary.csv").read_text().splitlines()[0] == \
        "epoch,loss,lr,knn_top1,images_per_s,seconds"
    model = load_model(f"local-dir:{tmp_path / 'whole' / 'model'}")
    assert model.num_classes == 0 and len(model.blocks) == 1 and not (tmp_path / "whole" / "checkpoint").exists()
    assert load_model(str(tmp_path / "whole")).pretrained_cfg["mean"] == model.pretrained_cfg["mean"]
    mean = model.pretrained_cfg["mean"][0]
    assert 0.1 < mean < 0.15  # measured on mnist-5k's train images, not a constant
    # MAE's recipe by default: fixed sin-cos positions (untouched by training), lr by its rule, recorded.
    expected = torch.cat([torch.zeros(1, 32), sincos_pos_embed((4, 4), 32)])[None]
    torch.testing.assert_close(model.pos_embed, expected, atol=1e-6, rtol=0)
    resolved = yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())
    assert resolved["resolved"]["lr"] == pytest.approx(1.5e-4 * 1024 / 256)
    assert (resolved["settings"]["pos_embed"], resolved["settings"]["init"]) == ("sincos", "mae")

    with interrupted_after_first_checkpoint(monkeypatch, pretrain_module):
        pretrain(mae_config(tmp_path / "cut"))
    saved = load_file(str(tmp_path / "cut" / "checkpoint" / run_folder.CHECKPOINT_FILES[0]))
    assert any(k.startswith("decoder.") for k in saved) and any(k.startswith("encoder.") for k in saved)
    resumed = pretrain(mae_config(tmp_path / "cut", resume="auto"))
    assert [row["loss"] for row in resumed["epochs"]] == [row["loss"] for row in whole["epochs"]]
    assert resumed["knn_top1"] == whole["knn_top1"]
    a = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_maes_lr_rule_scales_with_the_effective_batch_unless_lr_is_given(tmp_path):
    assert mae_config(tmp_path, batch_size=512).peak_lr() == pytest.approx(3e-4)  # 1.5e-4 x 512 / 256
    assert mae_config(tmp_path, batch_size=512).peak_lr(world_size=4) == pytest.approx(1.2e-3)
    assert mae_config(tmp_path, batch_size=512, blr=1e-4).peak_lr() == pytest.approx(2e-4)
    assert mae_config(tmp_path, batch_size=512, lr=5e-4).peak_lr(world_size=4) == 5e-4  # absolute
    assert PretrainConfig(data="mnist-5k", output=str(tmp_path), batch_size=512).peak_lr() == 1e-3  # supervised


def test_mae_encoders_get_fixed_sincos_positions_and_maes_init_by_default(tmp_path):
    config = mae_config(tmp_path, embed_dim=32, num_heads=2)
    model = pretrain_module.create_vit(config, ["a", "b"], 0.5, 0.25)
    grid = tuple(model.patch_embed.grid_size)
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_pos_embed(grid, 32))
    assert not model.pos_embed[0, 0].any() and not model.pos_embed.requires_grad  # the CLS position: zeros, fixed
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(not m.bias.any() for m in linears)  # MAE: zero biases (timm: trunc-normal weights, zero biases too)
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))  # xavier-uniform's
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert 0.01 < model.cls_token.std() < 0.03  # normal(0.02); timm's is 1e-6
    timm_like = pretrain_module.create_vit(mae_config(tmp_path, pos_embed="learned", init="timm"), ["a"], 0.5, 0.25)
    assert timm_like.pos_embed.requires_grad and timm_like.cls_token.abs().max() < 1e-4
    supervised = PretrainConfig(data="mnist-5k", output=str(tmp_path))
    assert (supervised.pos_embed, supervised.init) == ("learned", "timm")


def test_mae_pretraining_reads_class_folders_through_the_pil_loader(tmp_path, monkeypatch):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(8):
                pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "data" / split / label / f"{i}.png")
    result = pretrain(mae_config(tmp_path / "run", data=str(tmp_path / "data"), batch_size=4, epochs=1,
                                 warmup_epochs=0, eval_every=1))
    assert len(result["epochs"]) == 1 and 0 <= result["knn_top1"] <= 1 and math.isfinite(result["epochs"][0]["loss"])
    assert load_model(str(tmp_path / "run")).num_classes == 0


def test_mae_pretraining_runs_on_an_unlabeled_folder_without_its_knn_monitor(tmp_path, capsys):
    """No labels, no test split: MAE trains (the monitor is off); the supervised objective is refused in one line."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    (tmp_path / "photos").mkdir()
    for i in range(12):
        pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "photos" / f"{i}.png")
    code = main(["pretrain", "--objective", "mae", "--data", str(tmp_path / "photos"), "--output",
                 str(tmp_path / "run"), "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--decoder-dim", "32",
                 "--decoder-depth", "1", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
                 "--num-workers", "0", "--device", "cpu"])
    assert code == 0 and "no labels: no kNN monitor" in capsys.readouterr().out
    assert load_model(str(tmp_path / "run")).num_classes == 0
    assert main(["pretrain", "--data", str(tmp_path / "photos"), "--output", str(tmp_path / "sup")]) == 2
    assert "pretrain --objective supervised) needs labels" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "byol"}, "--objective 'byol'"),
    ({"mask_ratio": 1.0}, "--mask-ratio 1.0"),
    ({"decoder_dim": 30}, "--decoder-dim 30"),
    ({"decoder_dim": 100}, "--decoder-dim 100"),
    ({"decoder_depth": 0}, "--decoder-depth 0"),
    ({"pos_embed": "rope"}, "--pos-embed 'rope'"),
    ({"init": "jax"}, "--init 'jax'"),
    ({"embed_dim": 30}, "--embed-dim 30 is invalid: expected a multiple of 4 with --pos-embed sincos"),
    ({"blr": 0}, "--blr 0"),
])
def test_mae_settings_are_checked_once_naming_the_flag(overrides, message, tmp_path):
    with pytest.raises(UserError, match=message):
        mae_config(tmp_path / "x", **overrides)


def test_the_cli_runs_pretrain_objective_mae_and_prints_the_knn_monitor(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain_module, "KNN_TRAIN", 500)
    monkeypatch.setattr(pretrain_module, "KNN_TEST", 200)
    code = main(["pretrain", "--objective", "mae", "--data", "mnist-5k", "--output", str(tmp_path / "run"),
                     "--depth", "1", "--embed-dim", "32", "--num-heads", "2", "--decoder-dim", "32",
                     "--decoder-depth", "1", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "512",
                     "--num-workers", "0", "--device", "cpu", "--mask-ratio", "0.5", "--no-norm-pix-loss"])
    assert code == 0 and "knn top1" in capsys.readouterr().out
    settings = (tmp_path / "run" / "config.yaml").read_text()
    assert "objective: mae" in settings and "mask_ratio: 0.5" in settings and "norm_pix_loss: false" in settings


# ---------------------------------------------------------------- bundled-mae


def test_a_missing_bundled_mae_teacher_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(specs.BUNDLED_TEACHERS, "bundled-mae", tmp_path / "teacher-mae")
    with pytest.raises(UserError, match="bundled-mae teacher is not in this install.*--objective mae"):
        load_model("bundled-mae")
    assert main(["inspect", "--teacher", "bundled-mae"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wecolora: error: the bundled-mae teacher") and err.count("\n") == 1


def test_bundled_mae_resolves_to_its_asset_folder(teacher_dir, monkeypatch):
    monkeypatch.setitem(specs.BUNDLED_TEACHERS, "bundled-mae", teacher_dir)
    specs.check_model_spec("bundled-mae")
    model, same = load_model("bundled-mae"), load_model(f"local-dir:{teacher_dir}")
    assert len(model.blocks) == 6 and torch.equal(model.pos_embed, same.pos_embed)


def test_the_bundled_mae_teacher_loads_by_name_and_probes_above_its_recipe_threshold(capsys):
    """The threshold (75%) is the one written in assets/teacher-mae/RECIPE.md."""
    assert main(["inspect", "--teacher", "bundled-mae", "--json"]) == 0
    assert '"teacher_blocks": 12' in capsys.readouterr().out
    teacher = load_model("bundled-mae")
    assert len(teacher.blocks) == 12 and teacher.embed_dim == 128 and teacher.num_classes == 0
    result = probe_on_fixed_fashion_slice(teacher, epochs=100, lr=4.0)
    assert result["top1"] >= 0.75, result


def test_device_eval_inputs_equal_the_models_eval_transform():
    from PIL import Image


    model = tiny_vit(depth=1, img_size=28, patch_size=7)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2,) * 3, "std": (0.4,) * 3, "crop_pct": 1.0}
    grey = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    expected = torch.stack([eval_transform(model)(Image.fromarray(g.numpy()).convert("RGB")) for g in grey])
    torch.testing.assert_close(resize_normalize(grey, 28, (0.2,) * 3, (0.4,) * 3), expected, atol=1e-5, rtol=0)
