import torch

from prompttune.methods.base import Method
from prompttune.methods.linear_probe import LinearProbe
from prompttune.module import FeatureCache, PromptTuningModule, lr_lambda
from prompttune.tasks.classification import ClassificationTask


class _DM:
    def info(self):
        return {"classnames": ["a", "b", "c"], "num_classes": 3}


def _module(tiny_clip, method=None):
    method = method or LinearProbe()
    method.setup(tiny_clip, _DM())
    return PromptTuningModule(tiny_clip, method, ClassificationTask(_DM().info()), optim={"lr": 0.1})


def test_only_the_method_may_train(tiny_clip):
    module = _module(tiny_clip)
    assert module.trainable_params == tiny_clip.embed_dim * 3 + 3
    tiny_clip.model.ln_final.weight.requires_grad_(True)
    try:
        import pytest

        with pytest.raises(RuntimeError, match="only the method's parameters may require grad.*ln_final"):
            _module(tiny_clip)
    finally:
        tiny_clip.model.ln_final.weight.requires_grad_(False)


def test_backbone_stays_in_eval_mode(tiny_clip):
    module = _module(tiny_clip)
    module.train()
    assert module.method.training and not tiny_clip.training
    assert not any(m.training for m in tiny_clip.modules())


def test_checkpoint_holds_only_the_trainable_state(tiny_clip):
    module = _module(tiny_clip)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == {"method.head.weight", "method.head.bias"}


def test_feature_cache_encodes_each_sample_once():
    calls = []
    cache = FeatureCache()

    def enc(rows):
        calls.append(len(rows))
        return torch.stack([torch.full((2,), float(i)) for i in rows])

    idx = torch.tensor([3, 1])
    out = cache.get("train", idx, lambda: enc([3, 1]))
    torch.testing.assert_close(out, torch.tensor([[3.0, 3.0], [1.0, 1.0]]))
    again = cache.get("train", idx, lambda: enc([99, 99]))  # must not call the encoder
    torch.testing.assert_close(again, out)
    assert calls == [2]
    cache.get("train", torch.tensor([1, 7]), lambda: enc([1, 7]))  # a new index: re-encode the batch
    assert calls == [2, 2]
    torch.testing.assert_close(cache.get("train", torch.tensor([7]), lambda: enc([0])), torch.tensor([[7.0, 7.0]]))


def test_module_feature_path_matches_direct_encoding(tiny_clip):
    module = _module(tiny_clip)
    images = torch.randn(4, 3, 32, 32)
    batch = {"image": images, "index": torch.arange(4), "label": torch.tensor([0, 1, 2, 0])}
    first = module(batch, "train")["logits"]
    direct = module.method(tiny_clip, {"features": tiny_clip.encode_image(images)})["logits"]
    torch.testing.assert_close(first, direct)
    batch2 = dict(batch, image=torch.zeros_like(images))  # cached: pixels are not read again
    torch.testing.assert_close(module(batch2, "train")["logits"], first)


def test_cosine_schedule_with_warmup():
    f = lr_lambda("cosine", total=10, warmup=2)
    assert f(0) == 0.5 and f(1) == 1.0 and abs(f(2) - 1.0) < 1e-9 and abs(f(10)) < 1e-9
    assert abs(f(6) - 0.5) < 1e-9
    assert lr_lambda("constant", 10, 0)(7) == 1.0


def test_manual_method_contract():
    class M(Method):
        manual_optimization = True

    assert M().manual_optimization and not Method().manual_optimization
