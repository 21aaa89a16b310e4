import copy

import open_clip
import pytest
import torch
from conftest import Recorder, make_local_teacher, random_clt, random_pixels
from PIL import Image

from clt_explorer.model import onednn_products
from clt_explorer.model.teacher import Teacher, TeacherMLPs, patch_product
from clt_explorer.model.tokens import token_index
from clt_explorer.model.zeroshot import ZeroShotClassifier
from clt_explorer.storage import save_tensors
from clt_explorer.training.tiny_clip import TINY_CLIP_CONFIG


@pytest.fixture(scope="module")
def clt(random_teacher):
    return random_clt(random_teacher, 4, "relu_topk", 16, seed=1)


def convolved_patches(visual, pixels):
    """The patch embedding [B, patches, width] as the convolution it is (the teacher computes it as a product)."""
    conv = visual.conv1
    return torch.nn.functional.conv2d(pixels, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_the_patch_product_is_the_convolution_whose_kernel_is_its_stride(bias):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 8, 8, bias=bias)
    product = patch_product(conv)
    for shape in [(2, 3, 32, 24), (1, 3, 16, 16), (2, 3, 30, 32)]:  # the last is not tiled: the convolution runs
        x = torch.randn(shape)
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=8)
        found = product(x)
        assert found.shape == expected.shape and torch.allclose(found, expected, atol=1e-5)
    overlapping = torch.nn.Conv2d(3, 16, 8, 4)
    assert patch_product(overlapping) == overlapping.forward


def test_the_patch_product_leaves_untiled_and_accelerator_inputs_to_the_convolution():
    convolved = []
    for device in ("cpu", "meta"):  # "meta" stands for an accelerator: no numbers, only shapes
        conv = torch.nn.Conv2d(3, 16, 8, 8, device=device)
        conv.forward = lambda x, conv=conv: convolved.append(tuple(x.shape)) or torch.nn.Conv2d.forward(conv, x)
        product = patch_product(conv)
        for shape in [(2, 3, 32, 24), (2, 3, 30, 32)]:
            assert product(torch.zeros(shape, device=device)).shape == (2, 16, shape[2] // 8, shape[3] // 8)
    assert convolved == [(2, 3, 30, 32), (2, 3, 32, 24), (2, 3, 30, 32)]


def test_the_teachers_products_through_onednn_give_open_clips_pass(tmp_path, inner_products):
    """The teacher's image tower (its products through oneDNN where available) against the same open_clip model
    without the teacher."""
    teacher = make_local_teacher(tmp_path, seed=3)
    torch.manual_seed(3)
    plain = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG)).eval()  # make_local_teacher's model, as it was built
    pixels = random_pixels(teacher, n=2)
    with torch.no_grad():
        expected = plain.encode_image(pixels)
    assert torch.allclose(teacher.encode_images(pixels), expected, atol=1e-5)
    assert torch.equal(teacher.model.visual.proj, plain.visual.proj)
    # the patch embedding, and per block the attention's two projections and the MLP's two layers
    assert len(inner_products) == (1 + 4 * teacher.n_layers if onednn_products.AVAILABLE else 0)


@pytest.mark.parametrize("arch,tokens", [("ViT-B-32-quickgelu", 50), ("ViT-B-16-quickgelu", 197)])
def test_capture_on_real_vit_b_configs(arch, tokens):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    teacher = Teacher(model, preprocess, open_clip.get_tokenizer(arch), arch)
    assert (teacher.n_layers, teacher.d_model, teacher.n_tokens) == (12, 768, tokens)
    pixels = random_pixels(teacher, n=2)
    capture = teacher.capture(pixels)
    assert capture.xs.shape == capture.ys.shape == (12, 2, tokens, 768)
    assert torch.equal(capture.embeddings, teacher.encode_images(pixels))
    visual = teacher.model.visual
    assert torch.allclose(visual._embeds(pixels)[:, 1:], visual.ln_pre(convolved_patches(visual, pixels) +
                                                                       visual.positional_embedding[1:]), atol=1e-5)
    block = teacher.blocks[5]
    assert torch.allclose(capture.ys[5], block.mlp(capture.xs[5]), atol=1e-6)


def test_capture_records_ln2_output_and_mlp_output(random_teacher):
    pixels = random_pixels(random_teacher)
    capture = random_teacher.capture(pixels)
    assert capture.xs.shape == (4, 3, 17, 64)
    for layer, block in enumerate(random_teacher.blocks):
        assert torch.equal(block.mlp(capture.xs[layer]), capture.ys[layer])
    # x_0 is ln_2 of (ln_pre(tokens) + attention): recompute it by hand from the first block.
    visual = random_teacher.model.visual
    with torch.no_grad():
        x = convolved_patches(visual, pixels)
        cls = visual.class_embedding.expand(x.shape[0], 1, -1)
        x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
        block = random_teacher.blocks[0]
        x = x + block.ls_1(block.attention(block.ln_1(x)))
        assert torch.allclose(block.ln_2(x), capture.xs[0], atol=1e-5)


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
@pytest.mark.parametrize("start", [0, 2, 3])
def test_replacing_every_mlp_by_itself_reproduces_the_embedding_exactly(random_teacher, tokens, start):
    pixels = random_pixels(random_teacher)
    baseline = random_teacher.encode_images(pixels)
    with random_teacher.replace_mlps(TeacherMLPs(random_teacher), start, tokens):
        replaced = random_teacher.encode_images(pixels)
    assert torch.equal(baseline, replaced)


def test_replacing_last_block_patches_leaves_the_embedding_unchanged(random_teacher, clt):
    pixels = random_pixels(random_teacher)
    baseline = random_teacher.encode_images(pixels)
    with random_teacher.replace_mlps(clt.surrogate(), random_teacher.n_layers - 1, "patches"):
        patches_replaced = random_teacher.encode_images(pixels)
    with random_teacher.replace_mlps(clt.surrogate(), random_teacher.n_layers - 1, "cls"):
        cls_replaced = random_teacher.encode_images(pixels)
    assert torch.equal(baseline, patches_replaced)
    assert not torch.allclose(baseline, cls_replaced)


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
@pytest.mark.parametrize("start", [0, 2])
def test_cascade_uses_codes_of_the_modified_pass(random_teacher, clt, tokens, start):
    """Outputs of the incremental CLT surrogate equal a full decode of the x_i recorded in the modified
    pass; below the start the pass is the teacher's; the replaced tokens' MLP outputs are the CLT's."""
    pixels = random_pixels(random_teacher)
    teacher_capture = random_teacher.capture(pixels)
    recorder = Recorder(clt.surrogate(sparse=True))
    with random_teacher.replace_mlps(recorder, start, tokens):
        random_teacher.encode_images(pixels)
    index = token_index(tokens)
    xs = torch.stack(recorder.inputs)
    with torch.no_grad():
        full = clt.decode(clt.encode(xs), sparse=False)
    assert torch.allclose(torch.stack(recorder.outputs), full, atol=1e-5)
    for layer in range(start + 1):  # the input of block `start` is still the teacher's
        assert torch.allclose(xs[layer], teacher_capture.xs[layer][:, index], atol=1e-6)
    if start + 1 < random_teacher.n_layers:
        assert not torch.allclose(xs[start + 1], teacher_capture.xs[start + 1][:, index], atol=1e-4)


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("error_term", [False, True])
def test_the_teachers_mlp_runs_only_where_its_output_is_read(random_teacher, clt, tokens, start, error_term):
    """Where a surrogate that does not read y replaces a token set, the MLP runs on the other tokens only (not at all
    for all tokens), and the pass is that of one that runs it on every token (a wrapper that reads y)."""
    pixels = random_pixels(random_teacher)
    n_tokens = random_teacher.capture(pixels).xs.shape[2]
    rows = {}
    hooks = [block.mlp.c_fc.register_forward_hook(lambda _, inputs, __, layer=layer: rows.update({layer: inputs[0]}))
             for layer, block in enumerate(random_teacher.blocks)]
    try:
        with random_teacher.replace_mlps(clt.surrogate(error_term=error_term), start, tokens):
            skipped = random_teacher.encode_images(pixels)
        ran = {layer: x.shape[1] for layer, x in sorted(rows.items())}
        rows.clear()
        with random_teacher.replace_mlps(Recorder(clt.surrogate(error_term=error_term)), start, tokens):
            expected = random_teacher.encode_images(pixels)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(skipped, expected)
    replaced = {"cls": 1, "patches": n_tokens - 1, "all": n_tokens}[tokens] * (not error_term)
    assert ran == {layer: n_tokens - replaced * (layer >= start) for layer in range(random_teacher.n_layers)
                   if layer < start or replaced < n_tokens}


def test_replacement_rejects_bad_arguments(random_teacher, clt):
    with pytest.raises(ValueError, match="start layer"):
        with random_teacher.replace_mlps(clt.surrogate(), 4, "all"):
            pass
    with pytest.raises(ValueError, match="token set"):
        token_index("register")


def test_hooks_are_inactive_outside_a_context(random_teacher, clt):
    pixels = random_pixels(random_teacher)
    before = random_teacher.encode_images(pixels)
    with random_teacher.replace_mlps(clt.surrogate(), 0, "all"):
        random_teacher.encode_images(pixels)
    assert torch.equal(before, random_teacher.encode_images(pixels))


def test_load_architecture_with_local_safetensors_weights(tmp_path):
    torch.manual_seed(3)
    model = open_clip.create_model("ViT-B-32-quickgelu")
    save_tensors(tmp_path / "weights.safetensors", model.state_dict())
    teacher = Teacher.load("ViT-B-32-quickgelu", str(tmp_path / "weights.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, teacher.model.state_dict()[name])
    assert teacher.identity.startswith("ViT-B-32-quickgelu@local:")



def test_dropping_the_text_tower_keeps_the_image_tower_and_frees_the_rest(tmp_path):
    """An app whose zero-shot classifier is built keeps only the image tower (and the logit scale)."""
    teacher = make_local_teacher(tmp_path)
    pixels = random_pixels(teacher, 2)
    before = teacher.encode_images(pixels)
    visual = sum(p.numel() for p in teacher.model.visual.parameters())
    assert sum(p.numel() for p in teacher.model.parameters()) > visual + 1
    ZeroShotClassifier.build(teacher, ["cat", "dog"], ["a photo of a {}."])
    teacher.drop_text_tower()
    assert sum(p.numel() for p in teacher.model.parameters()) == visual + 1  # + the logit scale
    assert torch.equal(teacher.encode_images(pixels), before)
    with pytest.raises(ValueError, match="text tower was freed"):
        ZeroShotClassifier.build(teacher, ["cat", "dog"], ["a photo of a {}."])

def test_load_refuses_pickled_weights(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        Teacher.load("ViT-B-32-quickgelu", str(tmp_path / "weights.pt"))


class DeltaSurrogate:
    """The teacher's own MLP plus a known delta [L, d] on the replaced tokens."""

    def __init__(self, teacher, delta):
        self.teacher, self.delta = teacher, delta

    def begin(self):
        pass

    def __call__(self, layer, x, index, y):
        return self.teacher.blocks[layer].mlp(x)[:, index] + self.delta[layer]


def forward_by_hand(teacher, pixels, start, tokens, delta):
    """The image tower written out: patch embedding, CLS token, positions, ln_pre, each block's attention and MLP
    (the MLP output of the chosen tokens shifted by delta[l] in blocks l >= start), ln_post and projection."""
    visual, index = teacher.model.visual, token_index(tokens)
    x = convolved_patches(visual, pixels)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for layer, block in enumerate(teacher.blocks):
        x = x + block.ls_1(block.attention(block.ln_1(x)))
        h = block.mlp(block.ln_2(x))
        if layer >= start:
            h[:, index] += delta[layer]
        x = x + block.ls_2(h)
    return visual.ln_post(x[:, 0]) @ visual.proj


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
@pytest.mark.parametrize("start", [0, 2])
def test_replacement_equals_a_hand_written_forward_pass_with_a_known_delta(random_teacher, tokens, start):
    """Unlike replacing an MLP by itself, this fails when the replacement is skipped or lands on other tokens."""
    pixels = random_pixels(random_teacher)
    generator = torch.Generator().manual_seed(7)
    delta = 0.5 * torch.randn(random_teacher.n_layers, random_teacher.d_model, generator=generator)
    with torch.no_grad():
        expected = forward_by_hand(random_teacher, pixels, start, tokens, delta)
        assert torch.allclose(forward_by_hand(random_teacher, pixels, 0, tokens, torch.zeros_like(delta)),
                              random_teacher.encode_images(pixels), atol=1e-5)  # the hand-written pass is the model's
    with random_teacher.replace_mlps(DeltaSurrogate(random_teacher, delta), start, tokens):
        replaced = random_teacher.encode_images(pixels)
    assert torch.allclose(replaced, expected, atol=1e-5)
    assert not torch.allclose(replaced, random_teacher.encode_images(pixels), atol=1e-3)


def test_pixel_bytes_are_those_of_the_preprocessed_batch(random_teacher):
    images = [Image.new("RGB", (40, 30), (i * 40, 0, 0)) for i in range(3)]
    assert random_teacher.pixel_bytes(3) == random_teacher.preprocess_images(images).nbytes
