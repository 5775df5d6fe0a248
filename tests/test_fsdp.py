"""lora_ref.fsdp: FSDP2 sharding of a QLoRA model, checked on the CPU with two gloo processes.

Two ranks, each with half of a global batch, must give the loss and the adapter gradients of one process
on the whole batch; every parameter must be a DTensor sharded across the ranks (the 4-bit codes too);
after one AdamW step rank 0 saves one PEFT-format adapter that lora_ref.adapters loads into an
unsharded model with the logits of the one-process model after the same step.
"""
import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lora_ref import fsdp, memory

WORLD, BATCH, SEQ, LR = 2, 4, 16, 1e-2


def _tokens():
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, folder):
    import os
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, config = fsdp.build_tiny_qlora(seed=0)
        fsdp.shard_qlora_model(model, mixed_precision=None)
        placements = {}
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor), name
            placements[name] = (tuple(p.placements), tuple(p.to_local().shape), tuple(p.shape), p.dtype,
                                p.requires_grad)
        per = BATCH // WORLD
        loss = fsdp.causal_lm_loss(model, _tokens()[rank * per:(rank + 1) * per])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        opt.step()
        state_local = {n: tuple(opt.state[p]["exp_avg"].to_local().shape)
                       for n, p in model.named_parameters() if p.requires_grad}
        fsdp.save_sharded_adapter(model, folder / "adapter", config)
        # the default policy: bf16 compute, 4-bit bytes stored as bf16 so the mixed-precision cast is a no-op
        bf, _ = fsdp.build_tiny_qlora(seed=0)
        fsdp.shard_qlora_model(bf)
        bf_loss = fsdp.causal_lm_loss(bf, _tokens()[rank * per:(rank + 1) * per])
        bf_loss.backward()
        bf_total = bf_loss.detach().clone()
        dist.all_reduce(bf_total)
        bf_codes = bf.model.layers[0].self_attn.q_proj.base_layer.weight_bytes.dtype
        bf_grad = float(bf.model.layers[0].self_attn.q_proj.lora_A.grad.full_tensor().abs().max())
        if rank == 0:
            torch.save({"loss": float(total) / WORLD, "grads": grads, "placements": placements,
                        "state_local": state_local, "shard": str(Shard(0)), "bf16_loss": float(bf_total) / WORLD,
                        "bf16_codes": bf_codes, "bf16_grad": bf_grad}, folder / "rank0.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=True)
    return folder, torch.load(folder / "rank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def single():
    """One process, the whole batch, the same model: loss, gradients, and the model after one step."""
    model, _ = fsdp.build_tiny_qlora(seed=0)
    loss = fsdp.causal_lm_loss(model, _tokens())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    return float(loss.detach()), grads, model


def test_same_loss_and_adapter_gradients_as_one_process(sharded, single):
    _, res = sharded
    loss, grads, _ = single
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert res["grads"].keys() == grads.keys() and len(grads) == 2 * 7 * 2      # A, B on 7 linears x 2 layers
    for name, g in grads.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_every_parameter_is_sharded_across_ranks_and_4bit_codes_stay_frozen(sharded):
    _, res = sharded
    pl = res["placements"]
    for name, (placements, local, full, dtype, trainable) in pl.items():
        assert [str(p) for p in placements] == [res["shard"]], name
        assert local[0] == math.ceil(full[0] / WORLD), (name, local, full)      # half of dim 0 on each rank
    codes = [n for n in pl if n.endswith("base_layer.weight_bytes")]
    assert len(codes) == 14
    for n in codes:
        assert pl[n][3] == torch.uint8 and not pl[n][4], n          # packed NF4 bytes: frozen, uint8 storage
    assert all(pl[n][4] == ("lora_" in n) for n in pl)             # only adapters are trainable
    for name, local in res["state_local"].items():                  # AdamW moments hold the local shard only
        assert local == pl[name][1], name


def test_rank0_adapter_loads_with_the_logits_of_the_unsharded_model(sharded, single):
    from lora_ref.adapters import load_adapter, read_adapter
    from lora_ref.models import tiny_llama
    from lora_ref.qlora import quantize_model

    folder, _ = sharded
    _, _, stepped = single
    config, tensors = read_adapter(folder / "adapter")
    assert config.r == 4 and len(tensors) == 28
    fresh = tiny_llama(0)
    quantize_model(fresh)
    load_adapter(fresh, folder / "adapter")
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, stepped.eval()(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-5)


def test_shardable_layer_computes_the_same_as_linear4bit():
    from lora_ref.qlora import Linear4bit
    torch.manual_seed(0)
    q = Linear4bit.from_linear(torch.nn.Linear(64, 30, bias=False))   # 960 code bytes, uint8 absmax (DQ)
    x = torch.randn(3, 64)
    ref = q(x)
    s = fsdp.make_shardable(q, torch.bfloat16)                      # bytes viewed as bf16 (fsdp_qlora's trick)
    assert s._parameters["weight_bytes"].dtype == torch.bfloat16 and not s._parameters["weight_bytes"].requires_grad
    assert s.weight.dtype == torch.uint8 and s.absmax.dtype == torch.uint8
    torch.testing.assert_close(s(x), ref, rtol=0, atol=0)
    s.to(torch.float16)                                             # a dtype cast must not touch the bytes
    torch.testing.assert_close(s(x), ref, rtol=0, atol=0)
    with pytest.raises(TypeError):
        fsdp.make_shardable(torch.nn.Linear(2, 2))


def test_per_gpu_memory_by_hand():
    s = memory.ModelShape("toy", hidden=64, intermediate=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab=256)
    one = memory.training_memory(s, "qlora", r=4, batch=1, seq=8)
    assert fsdp.per_gpu_memory(s, 1, r=4, batch=1, seq=8).total == one.total     # N = 1: nothing changes
    two = fsdp.per_gpu_memory(s, 2, r=4, batch=1, seq=8)
    # one layer by hand: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128, NF4 + DQ (blocksize 64):
    # packed numel/2 + one uint8 absmax per 64 + fp32 absmax per 256 blocks + 256-entry map + offset
    numels = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128]
    layer = sum(n // 2 + n // 64 + 4 * 1 + 4 * 256 + 4 for n in numels)
    adapters = 4 * 4 * sum(i + o for o, i in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)])
    root = 2 * (256 * 64 + 256 * 64 + 64 + 2 * 2 * 64)     # embed, untied lm_head, final norm, 2 norms/layer (bf16)
    assert two.gathered == 2 * (layer + adapters) + root
    assert two.weights == math.ceil(one.weights / 2) and two.optimizer == math.ceil(one.optimizer / 2)
    g = one.gradients
    bottom = one.phases["backward_bottom"] - one.weights - one.optimizer - g
    assert two.phases["backward_bottom"] == (math.ceil(one.weights / 2) + math.ceil(one.optimizer / 2) + bottom
                                             + math.ceil(g / 2) + two.gathered)
    big = fsdp.per_gpu_memory("llama-2-70b", 2, batch=1, seq=512)
    assert big.total < memory.training_memory("llama-2-70b", "qlora", batch=1, seq=512).total
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError):
            fsdp.per_gpu_memory(s, bad)
    with pytest.raises(ValueError):
        fsdp.per_gpu_memory(s, 2, method="full")


def test_bf16_policy_stores_4bit_bytes_as_bf16_and_gives_the_fp32_loss_within_bf16_rounding(sharded, single):
    _, res = sharded
    loss, grads, _ = single
    assert res["bf16_codes"] == torch.bfloat16
    assert res["bf16_loss"] == pytest.approx(loss, rel=1e-2)
    assert res["bf16_grad"] == pytest.approx(float(grads["model.layers.0.self_attn.q_proj.lora_A"].abs().max()), rel=0.1)
