"""recipes/tiny_model.py: the initialisation that lets the bundled model see where things are."""
import json

import torch

from model.sat.checkpoint import build_model, load_model
import math
from pathlib import Path

import pytest

from recipes.tiny_model import init_vit_positions, make_init, position_codes, sincos_2d

SHIPPED = Path(__file__).resolve().parent.parent / "pretrained" / "visualglm-tiny"


def test_sincos_table_is_smooth_and_distinct():
    table = sincos_2d(16, 192)                                   # [256, 192], row-major patches
    assert table.shape == (256, 192)
    assert torch.allclose(table.norm(dim=1), table.norm(dim=1)[0].expand(256))   # every patch equally loud
    grid = table.view(16, 16, -1)
    centre = grid[8, 8]
    near, far = grid[8, 9] @ centre, grid[0, 0] @ centre
    assert near > far                                            # neighbours look alike, corners do not
    assert torch.linalg.matrix_rank(table.double()) > 20          # places are told apart
    rows = grid[:, 0, :96] - grid[0, 0, :96]                     # the first half follows the row only
    assert rows.abs().sum() > 0 and torch.equal(grid[3, 0, :96], grid[3, 7, :96])


def test_init_writes_a_loadable_checkpoint(tiny_config, tokenizer_dir, tmp_path):
    config = dict(tiny_config, hidden_dropout=0.0, attention_dropout=0.0)
    init = make_init(config, tmp_path / "init", tokenizer_dir, cross_gain=5.0, seed=3, pos_scale=1.0, lattice=0)
    m = load_model(str(init), device="cpu")
    table = m.get_mixin("eva").model.vit.transformer.position_embeddings.weight
    grid = int((table.shape[0] - 1) ** 0.5)
    assert torch.allclose(table[1:], sincos_2d(grid, table.shape[1]), atol=1e-6)
    assert json.loads((init / "model_config.json").read_text())["hidden_dropout"] == 0.0
    assert (init / "ice_text.model").is_file()


def test_init_vit_positions_leaves_the_cls_row(tiny_config):
    m = build_model(tiny_config, device="cpu")
    table = m.get_mixin("eva").model.vit.transformer.position_embeddings.weight
    with torch.no_grad():
        table.fill_(7.0)
    init_vit_positions(m, 2.0)
    assert torch.all(table[0] == 7.0) and table[1:].abs().max() <= 2.0 + 1e-6


def test_prepare_can_reuse_a_tokenizer(tokenizer_dir, tmp_path):
    from recipes.tiny_model import prepare
    config = prepare(tmp_path / "work", n_train=4, n_valid=2, questions_per_image=1, seed=1, vocab_size=500,
                     tokenizer=tokenizer_dir)
    work = tmp_path / "work"
    assert (work / "tokenizer" / "ice_text.model").read_bytes() == (tokenizer_dir / "ice_text.model").read_bytes()
    from model.sat.loading import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    assert config["pad_token_id"] == tok.pad_token_id and config["vocab_size"] >= len(tok)
    assert config["eva_args"]["attention_dropout"] == 0.0 and config["qformer_args"]["hidden_dropout"] == 0.0
    assert (work / "init" / "latest").is_file() and len((work / "train_files.txt").read_text().split()) == 1


def test_position_codes_dot_product_is_a_cosine_kernel_in_every_head():
    freqs = (0.15, 1.0)
    a = position_codes(torch.tensor(3.0), torch.tensor(5.0), 192, 64, freqs)
    b = position_codes(torch.tensor(7.5), torch.tensor(1.0), 192, 64, freqs)
    f = [freqs[0] * (freqs[1] / freqs[0]) ** (k / 15) for k in range(16)]        # 16 frequencies per head
    expected = sum(math.cos(x * (3.0 - 7.5)) + math.cos(x * (5.0 - 1.0)) for x in f)
    for h in range(3):
        head = slice(64 * h, 64 * (h + 1))
        assert abs((a[head] @ b[head]).item() - expected) < 1e-4
        assert abs((a[head] @ a[head]).item() - 32) < 1e-4                           # peak: 2 per frequency


def _token_change_per_cell(model):
    from model.image import preprocess
    from synthetic.scenes import CELLS, Scene, Shape
    blip = model.get_mixin("eva").model
    with torch.no_grad():
        tokens = torch.stack([blip(preprocess(Scene(background="white", shapes=(Shape("square", "red", c, radius=24),))
                                              .render(), 224))[0] for c in CELLS])   # [9 cells, 32, hidden]
    return (tokens - tokens.mean(0)).norm(dim=-1)                                    # [9, 32]


def _cell_of_lattice_point(k, lattice=5):
    row, col = divmod(k, lattice)
    return int((row + 0.5) / lattice * 3) * 3 + int((col + 0.5) / lattice * 3)


@pytest.mark.parametrize("lattice", [5, 0])
def test_spatial_queries_make_each_token_summarise_its_own_region(lattice, tmp_path):
    """At init, a lone square changes most the image token whose lattice point lies in the square's cell;
    with random queries (lattice 0) every token changes about alike."""
    config = json.loads((SHIPPED / "model_config.json").read_text())
    config["qformer_args"]["layernorm_order"] = "pre"
    init = make_init(config, tmp_path / "init", SHIPPED, cross_gain=5.0, seed=1, lattice=lattice)
    change = _token_change_per_cell(load_model(str(init), device="cpu").eval())[:, :25]
    hits = sum(_cell_of_lattice_point(int(change[cell].argmax())) == cell for cell in range(9))
    contrast = (change.max(1).values / change.median(1).values).mean().item()
    if lattice:
        assert hits == 9 and contrast > 4, (hits, contrast)
    else:
        assert contrast < 1.5, contrast
