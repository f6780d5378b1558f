"""PyTorch FSDP (v1, FULL_SHARD) with a frozen reference outside it: one AdamW and one Adafactor step, then the whole
state gathered. Checks torch's FSDP itself, on the CPU over gloo or on GPUs over NCCL (accelerate does not start FSDP
without an accelerator: on a CPU-only machine it runs DDP instead, see docs/full_finetuning.md).

    torchrun --nproc_per_node 2 full/launch/fsdp_check.py --model DIR [--device cpu]      # DIR: a diffusers pipeline
    accelerate launch --config_file full/launch/accelerate/8gpu_fsdp.yaml --num_processes 2 full/launch/fsdp_check.py \
        --model DIR                                      # also prints the distributed type accelerate picks

Each rank prints its shard size and the bytes of each optimizer's state; rank 0 prints the gathered parameter count
and whether the reference is unchanged, then "fsdp_check: OK".
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers pipeline directory (its unet/ is used)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.optimization import Adafactor

    if os.environ.get("ACCELERATE_USE_FSDP"):  # under `accelerate launch`: what the trainer's Accelerator would get
        from accelerate import Accelerator

        state = Accelerator(cpu=not torch.cuda.is_available()).state  # as full/run/accelerator.py asks for it
        print(f"rank {state.process_index}: accelerate's distributed_type: {state.distributed_type.value}", flush=True)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    rank = dist.get_rank()
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet")
    reference = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").requires_grad_(False).to(device)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    total = sum(p.numel() for p in unet.parameters())
    model = FSDP(unet, sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=device, use_orig_params=True,
                 auto_wrap_policy=ModuleWrapPolicy({BasicTransformerBlock, ResnetBlock2D}))
    local = sum(p.numel() for p in model.parameters())
    dims = sorted({p.dim() for p in model.parameters() if p.numel()})
    print(f"rank {rank}: FSDP on {device}: shard {local:,} of {total:,} parameters (shard tensors {dims}-D); "
          f"reference whole: {sum(p.numel() for p in reference.parameters()):,}", flush=True)
    config = unet.config
    side = config.sample_size
    for name, optimizer in (("adamw", torch.optim.AdamW(model.parameters(), lr=1e-4)),
                            ("adafactor", Adafactor(model.parameters(), lr=1e-4, scale_parameter=False,
                                                    relative_step=False, warmup_init=False))):
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(1, config.in_channels, side, side, generator=g).to(device)
        cond = {"encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=g).to(device)}
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            cond["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g).to(device),
                                         "time_ids": torch.randn(1, 6, generator=g).to(device)}
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            ref = reference(x, t, **cond).sample
        loss = ((model(x, t, **cond).sample - x) ** 2).mean() - ((ref - x) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v))
        print(f"rank {rank}: {name} step: loss {loss.item():+.5f}, optimizer state {state:,} bytes", flush=True)
    # offload_to_cpu=True with rank0_only=True (accelerate's setting) crashes torch 2.13 on the CPU: gather in place
    gathered = FullStateDictConfig(offload_to_cpu=args.device != "cpu", rank0_only=args.device != "cpu")
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, gathered):
        whole = model.state_dict()
    if rank == 0:
        unchanged = all(torch.equal(start[k], v) for k, v in reference.state_dict().items())
        print(f"rank 0: gathered {sum(v.numel() for v in whole.values()):,} parameters in {len(whole)} tensors; "
              f"reference unchanged: {unchanged}", flush=True)
        print("fsdp_check: OK" if unchanged and sum(v.numel() for v in whole.values()) == total else
              "fsdp_check: FAILED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
