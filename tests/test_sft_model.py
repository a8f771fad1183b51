"""The model side of finetuning: packed sequences kept apart, LIMA dropout, embedding growth, generation.

References: unpacked (one conversation per row) forwards for the packed ones; hand-computed dropout
rates and empirical drop fractions; the checkpoint's own rows and their float64 mean for growth;
stock transformers (MptForCausalLM, AutoTokenizer, and its `generate`) for export and greedy decoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import learnable_windows

from foundry.config.model import AttnConfig, MPTConfig
from foundry.data.batches import sft_rows
from foundry.data.sft_format import LOSS_MASK, PAD_SEQ_ID, SEQ_IDS, TOKENS
from foundry.errors import FoundryError
from foundry.models import build_model
from foundry.models.attention import alibi_slopes, plan_attention
from foundry.models.dropout import residual_dropout

transformers = pytest.importorskip("transformers")


def small_cfg(**kw) -> MPTConfig:
    attn = kw.pop("attn", {})
    base = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=64)
    base.update(kw)
    return MPTConfig(**base, attn_config=AttnConfig(**{"attn_impl": "torch", **attn}))


def window(conversations: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
    """One SFT window as data-prep writes it: conversations back to back, then padding."""
    tokens = np.zeros(length, np.int32)
    mask = np.zeros(length, np.uint8)
    seq = np.full(length, PAD_SEQ_ID, np.int32)
    at = 0
    for k, conv in enumerate(conversations):
        n = len(conv)
        tokens[at : at + n] = conv
        mask[at + 1 : at + n] = 1  # every token but the first of its conversation is a target
        seq[at : at + n] = k
        at += n
    return {TOKENS: tokens, LOSS_MASK: mask, SEQ_IDS: seq}


def conversation_losses(model, batch, packed: bool, n: int) -> list[float]:
    """Mean loss of each conversation's targets alone (packed: all in row 0; unpacked: one per row)."""
    out = []
    with torch.no_grad():
        for c in range(n):
            if packed:
                labels = torch.where(batch[SEQ_IDS] == c, batch["labels"], -100)
            else:
                labels = torch.full_like(batch["labels"], -100)
                labels[c] = batch["labels"][c]
            out.append(model(batch["input_ids"], labels=labels, seq_ids=batch[SEQ_IDS]).item())
    return out


CONVERSATION_LENGTHS = (9, 17, 30)  # and 8 padding slots in a window of 64


@pytest.fixture(scope="module")
def packing_case():
    rng = np.random.default_rng(0)
    convs = [rng.integers(0, 100, n).astype(np.int32) for n in CONVERSATION_LENGTHS]
    packed = sft_rows([window(convs, 64)], lambda s: s[TOKENS])
    unpacked = sft_rows([window([c], 64) for c in convs], lambda s: s[TOKENS])
    model = build_model(small_cfg(), vocab_size=100, seed=1).eval()
    return model, packed, unpacked


def test_packed_and_unpacked_give_the_same_loss_per_conversation(packing_case):
    model, packed, unpacked = packing_case
    assert packed[SEQ_IDS][0, 56:].eq(PAD_SEQ_ID).all() and packed["position_ids"][0, 9].item() == 0
    together = conversation_losses(model, packed, True, 3)
    alone = conversation_losses(model, unpacked, False, 3)
    assert together == pytest.approx(alone, abs=1e-5)
    # Without the mask, the later conversations see the earlier ones: their losses change.
    with torch.no_grad():
        leaky = [
            model(
                packed["input_ids"], labels=torch.where(packed[SEQ_IDS] == c, packed["labels"], -100)
            ).item()
            for c in range(3)
        ]
    assert leaky[0] == pytest.approx(alone[0], abs=1e-5)
    assert abs(leaky[1] - alone[1]) > 1e-3 and abs(leaky[2] - alone[2]) > 1e-3


def test_padding_attends_to_itself_only_and_never_gives_nan():
    seq = torch.tensor([[0, 0, 1, -1, -1]])
    plan = plan_attention("torch", alibi_slopes(2), 5, torch.float32, {}, seq_ids=seq)
    allowed = torch.isfinite(plan.bias[0, 0])
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    model = build_model(small_cfg(), vocab_size=100, seed=1).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 100, (1, 5)), seq_ids=seq)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_flex_document_mask_matches_unpacked_rows_on_cpu(packing_case):
    """Compiled FlexAttention on the CPU (one shape, one compile): its block mask isolates as the torch path does."""
    model, packed, unpacked = packing_case
    alone = conversation_losses(model, unpacked, False, 3)  # torch path: the reference
    model.cfg.attn_config.attn_impl = "flex"
    try:
        assert model.attn_impl("cpu") == "flex"
        together = conversation_losses(model, packed, True, 3)
    finally:
        model.cfg.attn_config.attn_impl = "torch"
    assert together == pytest.approx(alone, abs=1e-4)


def test_flash_refuses_packed_sequences():
    with pytest.raises(FoundryError, match="packed"):
        plan_attention(
            "flash", alibi_slopes(2), 4, torch.float32, {}, seq_ids=torch.zeros(1, 4, dtype=torch.long)
        )


# --- dropout ---------------------------------------------------------------------------------------------


def test_lima_dropout_rates_per_layer():
    cfg = small_cfg(n_layers=5, resid_pdrop=0.25, lima_dropout=True)
    model = build_model(cfg, vocab_size=50, seed=0)
    expected = [0.0, 0.0625, 0.125, 0.1875, 0.25]  # 0.25 * l / 4
    assert [b.resid_attn_dropout.p for b in model.blocks] == pytest.approx(expected)
    assert [b.resid_ffn_dropout.p for b in model.blocks] == pytest.approx(expected)
    assert [residual_dropout(cfg, layer) for layer in range(5)] == pytest.approx(expected)
    plain = build_model(small_cfg(n_layers=3, resid_pdrop=0.25), vocab_size=50, seed=0)
    assert [b.resid_attn_dropout.p for b in plain.blocks] == [0.25] * 3
    assert residual_dropout(small_cfg(n_layers=1, resid_pdrop=0.3, lima_dropout=True), 0) == 0.0


def test_lima_dropout_drops_at_each_layers_rate_in_training():
    """The fraction of residual-branch values zeroed in training, measured per layer."""
    model = build_model(small_cfg(n_layers=3, resid_pdrop=0.6, lima_dropout=True), vocab_size=50, seed=0)
    fractions: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for i, block in enumerate(model.blocks):
        block.resid_ffn_dropout.register_forward_hook(
            lambda m, args, out, i=i: fractions[i].append(
                float(((out == 0) & (args[0] != 0)).sum() / args[0].ne(0).sum())
            )
        )
    model.train()
    torch.manual_seed(0)
    model(torch.randint(0, 50, (8, 64)))
    assert fractions[0][0] == 0.0
    assert fractions[1][0] == pytest.approx(0.3, abs=0.03) and fractions[2][0] == pytest.approx(0.6, abs=0.03)
    model.eval()
    model(torch.randint(0, 50, (8, 64)))
    assert fractions[2][1] == 0.0


@pytest.mark.parametrize("kw", [{"emb_pdrop": 0.3}, {"resid_pdrop": 0.3}, {"attn": {"attn_pdrop": 0.3}}])
def test_each_dropout_acts_in_training_only(kw):
    model = build_model(small_cfg(**kw), vocab_size=50, seed=0)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


# --- embedding growth ------------------------------------------------------------------------------------


def _added_tokens_tokenizer(tmp_path, base_words: int):
    """A word-level tokenizer of `base_words` tokens, saved, and the same with ChatML's two tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(base_words - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    out = tmp_path / "tok-chatml"
    fast.save_pretrained(out)
    return out


def test_checkpoint_with_fewer_rows_grows_into_the_model_and_exports_to_transformers(tmp_path, caplog):
    from foundry.checkpoint import load_into, load_model_weights, save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TrainConfig
    from foundry.convert.hf import export_hf

    cfg = small_cfg()
    old = build_model(cfg, vocab_size=128, seed=3)  # 128 rows
    old_rows = old.transformer.wte.weight.detach().clone()
    save_weights(tmp_path / "ckpt", old.state_dict(), to_yaml(TrainConfig(model=cfg)))

    model = build_model(cfg, vocab_size=130, seed=9)  # a tokenizer of 130 tokens: 256 rows
    assert model.transformer.wte.weight.shape[0] == 256
    with caplog.at_level("INFO", logger="foundry"):
        load_into(model, tmp_path / "ckpt")
    assert "grows from 128 to 256 rows" in caplog.text
    rows = model.transformer.wte.weight.detach()
    assert torch.equal(rows[:128], old_rows)
    mean = old_rows.double().mean(0)
    assert (rows[128:].double() - mean).abs().max() < 1e-6
    for key, value in old.state_dict().items():  # everything else as saved
        if key != "transformer.wte.weight":
            assert torch.equal(model.state_dict()[key], value), key

    # Exported with the tokenizer that has the new tokens, stock transformers computes our logits.
    tok_dir = _added_tokens_tokenizer(tmp_path, 128)
    out = export_hf(model.state_dict(), cfg, 130, tmp_path / "hf", tokenizer_dir=str(tok_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok("<|im_start|> w3 w5 <|im_end|>", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [128, 5, 7, 129]
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids)).abs().max() < 1e-4
    assert torch.equal(hf.transformer.wte.weight.detach()[128:130], rows[128:130])
    # ... and the grown rows survive a checkpoint of their own.
    save_weights(tmp_path / "grown", model.state_dict(), to_yaml(TrainConfig(model=cfg)))
    assert torch.equal(load_model_weights(tmp_path / "grown")["transformer.wte.weight"], rows)


def test_other_shape_mismatches_are_still_refused(tmp_path):
    from foundry.checkpoint import load_into, save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TrainConfig
    from foundry.errors import CheckpointError

    small = build_model(small_cfg(), vocab_size=256, seed=3)
    save_weights(tmp_path / "ckpt", small.state_dict(), to_yaml(TrainConfig(model=small_cfg())))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_into(build_model(small_cfg(d_model=128), vocab_size=256, seed=0), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="do not fit"):  # fewer rows than the checkpoint: no shrinking
        load_into(build_model(small_cfg(), vocab_size=128, seed=0), tmp_path / "ckpt")


def test_hf_folder_with_fewer_rows_grows_too(tmp_path):
    from foundry.convert.hf import export_hf, load_hf_into

    cfg = small_cfg()
    old = build_model(cfg, vocab_size=100, seed=3)
    export_hf(old.state_dict(), cfg, 100, tmp_path / "hf")
    model = build_model(cfg, vocab_size=200, seed=0)
    load_hf_into(model, tmp_path / "hf")
    rows = model.transformer.wte.weight.detach()
    assert torch.equal(rows[:128], old.transformer.wte.weight.detach())
    assert (rows[128:].double() - old.transformer.wte.weight.double().mean(0)).abs().max() < 1e-6


# --- generation ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny MPT trained for a few seconds on arithmetic sequences: its greedy continuations vary."""
    torch.manual_seed(0)
    model = build_model(small_cfg(), vocab_size=100, seed=1)
    data = torch.from_numpy(learnable_windows(512, 32, 100, 0)).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(60):
        batch = data[(i * 16) % 512 :][:16]
        labels = torch.full_like(batch, -100)
        labels[:, :-1] = batch[:, 1:]
        model(batch, labels=labels).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_greedy_generation_with_cache_equals_without_and_equals_transformers(trained_tiny, tmp_path):
    from foundry.convert.hf import export_hf
    from foundry.eval.generate import Sampling, generate_ids

    cpu = torch.device("cpu")
    prompt = [5, 8, 11, 14]
    cached = generate_ids(trained_tiny, prompt, Sampling(max_new_tokens=40), device=cpu, precision="fp32")
    recomputed = generate_ids(
        trained_tiny, prompt, Sampling(max_new_tokens=40, use_cache=False), device=cpu, precision="fp32"
    )
    assert len(set(cached)) > 10  # a varied continuation, not one token repeated
    assert cached == recomputed

    out = export_hf(trained_tiny.state_dict(), trained_tiny.cfg, 100, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reference = hf.generate(
        torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0
    )
    assert cached == reference[0, len(prompt) :].tolist()


def test_sampling_is_seeded_and_the_same_with_or_without_cache(trained_tiny):
    from foundry.eval.generate import Sampling, generate_ids

    cpu = torch.device("cpu")

    def run(**kw):
        return generate_ids(
            trained_tiny, [3, 4, 5], Sampling(max_new_tokens=25, **kw), device=cpu, precision="fp32"
        )

    a = run(temperature=1.5, top_p=0.95, seed=7)
    assert a == run(temperature=1.5, top_p=0.95, seed=7, use_cache=False)
    assert a != run(temperature=1.5, top_p=0.95, seed=8)
    assert a != run()  # greedy differs from a hot sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    from foundry.eval.generate import Sampling, next_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {next_token(logits, Sampling(temperature=1.0, top_p=0.75), g) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn
    seen = {next_token(logits, Sampling(temperature=1.0, top_p=1.0), g) for _ in range(300)}
    assert seen == {0, 1, 2, 3}
    assert next_token(logits, Sampling(vocab_size=3, temperature=0), g) == 0


def test_generation_stops_at_a_stop_token_and_at_the_models_length(trained_tiny):
    from foundry.eval.generate import Sampling, generate_ids

    cpu = torch.device("cpu")
    free = generate_ids(
        trained_tiny, [5, 8, 11, 14], Sampling(max_new_tokens=20), device=cpu, precision="fp32"
    )
    stop = free[5]
    stopped = generate_ids(
        trained_tiny,
        [5, 8, 11, 14],
        Sampling(max_new_tokens=20, stop_ids=(stop,)),
        device=cpu,
        precision="fp32",
    )
    assert stopped == free[: free.index(stop) + 1]
    long = generate_ids(
        trained_tiny, list(range(60)), Sampling(max_new_tokens=20), device=cpu, precision="fp32"
    )
    assert len(long) == 4  # max_seq_len 64


# --- CUDA: the packed flex path against the torch path ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flex_document_mask_matches_masked_sdpa_forward_and_backward():
    """Packed rows of random conversation lengths (and padding): flex's per-batch BlockMask gives the torch
    path's logits and gradients, compiled, with the kernel options that assume contiguous blocks."""
    import torch.nn.functional as F

    from foundry.train.parallel import apply_compile

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    models = {
        impl: build_model(
            small_cfg(d_model=256, n_heads=4, max_seq_len=1024), vocab_size=1000, device="cuda", seed=1
        )
        for impl in ("torch", "flex")
    }
    # Compiled as the trainer compiles it: only then does flex run the Triton kernel that takes the kernel
    # options (eager flex ignores them, and so passed with the BLOCKS_ARE_CONTIGUOUS bug of 2026-12-01).
    apply_compile(models["flex"])
    rows = []
    for _ in range(3):
        lengths = rng.integers(20, 300, 8)
        convs, total = [], 0
        for n in lengths:
            if total + n > 1000:
                break
            convs.append(rng.integers(0, 1000, n).astype(np.int32))
            total += n
        rows.append(window(convs, 1024))
    batch = {k: v.cuda() for k, v in sft_rows(rows, lambda s: s[TOKENS]).items()}

    def run(impl):
        model = models[impl]
        model.cfg.attn_config.attn_impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch["input_ids"], labels=batch["labels"], seq_ids=batch[SEQ_IDS])
        loss.backward()
        return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    loss_ref, grad_ref = run("torch")
    loss, grad = run("flex")
    assert torch.isfinite(grad).all()
    assert abs(loss.item() - loss_ref.item()) < 2e-2
    assert F.cosine_similarity(grad, grad_ref, dim=0) > 0.99


def test_flex_kernel_options_for_document_masks_leave_out_blocks_are_contiguous():
    """BLOCKS_ARE_CONTIGUOUS with a document mask gave a wrong loss and NaN gradients on an H200
    (benchmarks/sft_grad_check.py, 2026-12-01): it is only for the plain causal mask."""
    from foundry.models.attention import alibi_slopes, plan_attention

    slopes = alibi_slopes(4)
    seq_ids = torch.tensor([[0] * 40 + [1] * 60 + [-1] * 28])
    plain = plan_attention("flex", slopes, 128, torch.float32, {})
    packed = plan_attention("flex", slopes, 128, torch.float32, {}, seq_ids=seq_ids)
    assert plain.kernel_options.get("BLOCKS_ARE_CONTIGUOUS") is True
    assert "BLOCKS_ARE_CONTIGUOUS" not in packed.kernel_options
    caller = plan_attention("flex", slopes, 128, torch.float32, {}, {"BLOCKS_M": 64}, seq_ids=seq_ids)
    assert caller.kernel_options == {"BLOCKS_M": 64}
