"""A stand-in for the embedded Gemma 3 270M base, for the fast conversion tests: the same
architecture, hyperparameters and tensor names and shapes, no tokenizer, and weights that
are all zero bytes of a sparse file (so it is written in milliseconds and takes no disk).
Conversion only reads a base's header, so everything but llama.cpp itself sees the real
thing; tests that load a model use the real file (marked e2e).
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

BLOCKS, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, HEAD_DIM, N_VOCAB = 18, 640, 2048, 4, 1, 256, 262144


def _tensors() -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) as in gemma-3-270m-q4_k_m.gguf."""
    q, kv = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    out = [("token_embd.weight", (N_VOCAB, N_EMBD)), ("output_norm.weight", (N_EMBD,))]
    for i in range(BLOCKS):
        out += [(f"blk.{i}.{name}.weight", shape) for name, shape in (
            ("attn_norm", (N_EMBD,)), ("attn_q", (q, N_EMBD)), ("attn_k", (kv, N_EMBD)), ("attn_v", (kv, N_EMBD)),
            ("attn_output", (N_EMBD, q)), ("attn_q_norm", (HEAD_DIM,)), ("attn_k_norm", (HEAD_DIM,)),
            ("post_attention_norm", (N_EMBD,)), ("ffn_norm", (N_EMBD,)), ("ffn_gate", (N_FF, N_EMBD)),
            ("ffn_up", (N_FF, N_EMBD)), ("ffn_down", (N_EMBD, N_FF)), ("post_ffw_norm", (N_EMBD,)))]
    return out


def write_fake_base(path: Path) -> Path:
    from localgemma.gguf_header import read_header, tensor_nbytes

    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(BLOCKS)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_context_length(32768)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, shape in _tensors():
        nbytes = int(np.prod(shape)) * 4
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = read_header(path)
    end = header.data_start + max(t.offset + tensor_nbytes(t) for t in header.tensors.values())
    os.truncate(path, end)  # the weights: zeros, and sparse
    return path
