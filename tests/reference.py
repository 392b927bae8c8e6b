"""An independent, plain-torch VisualGLM forward written from the spec (sections 3-4), reading the raw
state dict. Tests compare the sat-based model against it; it shares no code with model/."""
import math

import torch
import torch.nn.functional as F


def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def linear(x, sd, prefix, bias=True):
    return x @ sd[prefix + ".weight"].T + (sd[prefix + ".bias"] if bias else 0)


def attention(q, k, v, heads, mask=None):
    # q [S, H], k/v [T, H] -> [S, H]; mask [S, T] bool (True = may attend)
    S, T, hd = q.shape[0], k.shape[0], q.shape[1] // heads
    q, k, v = (t.reshape(-1, heads, hd).transpose(0, 1) for t in (q, k, v))     # [heads, *, hd]
    scores = (q / math.sqrt(hd)) @ k.transpose(1, 2)                               # [heads, S, T]
    if mask is not None:
        scores = scores.masked_fill(~mask, -10000.0)
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(S, -1)


def rotate(u, pos):
    # u [S, heads, d]; GPT-NeoX half-split pairing (i, i + d/2); inv_freq_j = 10000^(-2j/d)
    d = u.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angle = pos[:, None].float() * inv_freq[None]                                   # [S, d/2]
    angle = torch.cat([angle, angle], -1)[:, None, :]                                # [S, 1, d]
    rot_half = torch.cat([-u[..., d // 2:], u[..., : d // 2]], -1)
    return u * angle.cos() + rot_half * angle.sin()


def vision(sd, cfg, pixels):
    """pixels [3, H, W] -> [image_length, glm_hidden]."""
    e, qf = cfg["eva_args"], cfg["qformer_args"]
    P = "mixins.eva.model."
    v = P + "vit."
    patches = F.conv2d(pixels[None], sd[v + "mixins.patch_embedding.proj.weight"],
                       sd[v + "mixins.patch_embedding.proj.bias"], stride=e["patch_size"])
    x = torch.cat([sd[v + "transformer.word_embeddings.weight"][:1], patches.flatten(2)[0].T])
    x = x + sd[v + "transformer.position_embeddings.weight"]
    for i in range(e["num_layers"]):
        p = f"{v}transformer.layers.{i}."
        a = layer_norm(x, sd, p + "input_layernorm", e["layernorm_epsilon"])
        q, k, val = linear(a, sd, p + "attention.query_key_value").chunk(3, -1)
        x = x + linear(attention(q, k, val, e["num_attention_heads"]), sd, p + "attention.dense")
        m = layer_norm(x, sd, p + "post_attention_layernorm", e["layernorm_epsilon"])
        x = x + linear(F.gelu(linear(m, sd, p + "mlp.dense_h_to_4h")), sd, p + "mlp.dense_4h_to_h")
    enc = layer_norm(x, sd, v + "mixins.cls.ln_vision", 1e-5)

    q_ = P + "qformer.transformer."
    eps = qf["layernorm_epsilon"]
    x = sd[q_ + "word_embeddings.weight"][: cfg["image_length"]]
    for i in range(qf["num_layers"]):
        p = f"{q_}layers.{i}."
        a = layer_norm(x, sd, p + "input_layernorm", eps)
        q, k, val = linear(a, sd, p + "attention.query_key_value").chunk(3, -1)
        m = layer_norm(a + linear(attention(q, k, val, qf["num_attention_heads"]), sd, p + "attention.dense"),
                       sd, p + "post_attention_layernorm", eps)
        if qf["is_decoder"][i]:
            cq = linear(m, sd, p + "cross_attention.query")
            ck, cv = linear(enc, sd, p + "cross_attention.key_value").chunk(2, -1)
            c = linear(attention(cq, ck, cv, qf["num_attention_heads"]), sd, p + "cross_attention.dense")
            m = layer_norm(m + c, sd, p + "post_cross_attention_layernorm", eps)
        x = m + linear(F.gelu(linear(m, sd, p + "mlp.dense_h_to_4h")), sd, p + "mlp.dense_4h_to_h")
    x = layer_norm(x, sd, q_ + "final_layernorm", eps)
    return linear(x, sd, P + "glm_proj")


def glm_logits(sd, cfg, ids, image_embeds=None, pre_image=0):
    """ids: list of token ids of one sequence whose last token is <sop> (context = all before it)."""
    L, heads, H = cfg["num_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    alpha = math.sqrt(2 * L)
    S = len(ids)
    c = S - 1                                    # index of <sop>
    x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]
    if image_embeds is not None:
        x = x.clone()
        x[pre_image:pre_image + image_embeds.shape[0]] = image_embeds
    idx = torch.arange(S)
    pos = torch.where(idx < c, idx, torch.tensor(c - 1))
    block = torch.clamp(idx - c + 1, min=0)
    mask = (idx[None, :] < c) | (idx[None, :] <= idx[:, None])
    hd = H // heads
    for i in range(L):
        p = f"transformer.layers.{i}."
        a = layer_norm(x, sd, p + "input_layernorm", 1e-5)
        q, k, v = (t.reshape(S, heads, hd) for t in linear(a, sd, p + "attention.query_key_value").chunk(3, -1))
        q = torch.cat([rotate(q[..., : hd // 2], pos), rotate(q[..., hd // 2:], block)], -1)
        k = torch.cat([rotate(k[..., : hd // 2], pos), rotate(k[..., hd // 2:], block)], -1)
        attn = linear(attention(q.reshape(S, H), k.reshape(S, H), v.reshape(S, H), heads, mask), sd,
                      p + "attention.dense")
        h = alpha * a + attn
        m = layer_norm(h, sd, p + "post_attention_layernorm", 1e-5)
        mlp = linear(F.gelu(linear(m, sd, p + "mlp.dense_h_to_4h"), approximate="tanh"), sd, p + "mlp.dense_4h_to_h")
        x = alpha * m + mlp
    x = layer_norm(x, sd, "transformer.final_layernorm", 1e-5)
    return x @ sd["mixins.chatglm-final.lm_head.weight"].T
