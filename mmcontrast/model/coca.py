"""CoCa's teacher-forced caption pass, stopping short of the b x L x V logits.

open_clip's `CoCa.forward` returns the decoder's full logits; the caption loss only needs the
decoder's last hidden states and its output projection, which losses.caption consumes in chunks.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from mmcontrast.losses.caption import caption_token_nll


def is_coca_config(clip_cfg: dict) -> bool:
    """open_clip builds a CoCa model exactly when the config has a multimodal (decoder) part."""
    return "multimodal_cfg" in clip_cfg


@torch.no_grad()
def init_decoder(decoder) -> None:
    """Initialise open_clip's CoCa text decoder as its own `init_parameters` intends.

    open_clip never calls MultimodalTransformer.init_parameters (and it would fail: it reads
    `self.transformer`), so `text_projection` stays `torch.empty` memory: garbage, NaN or
    different on every rank (open_clip #551, #554). Same scheme as open_clip's text tower.
    """
    width, layers = decoder.width, decoder.layers
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


def decoder_hidden(decoder, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
    """open_clip MultimodalTransformer.forward up to (and including) ln_final, without the
    projection to the vocabulary. image_tokens (b, n, w), text_tokens (b, L, w) -> (b, L, w)."""
    seq_len = text_tokens.shape[1]
    if not decoder.batch_first:
        image_tokens, text_tokens = image_tokens.transpose(0, 1), text_tokens.transpose(0, 1)
    mask = decoder.attn_mask[:seq_len, :seq_len]
    for block, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        if decoder.grad_checkpointing and torch.is_grad_enabled():
            text_tokens = checkpoint(block, text_tokens, None, None, mask, use_reentrant=False)
            text_tokens = checkpoint(
                cross, text_tokens, image_tokens, image_tokens, None, use_reentrant=False
            )
        else:
            text_tokens = block(text_tokens, attn_mask=mask)
            text_tokens = cross(text_tokens, k_x=image_tokens, v_x=image_tokens)
    if not decoder.batch_first:
        text_tokens = text_tokens.transpose(0, 1)
    return decoder.ln_final(text_tokens)


def coca_forward(coca, image, text, valid=None, chunk=None):
    """Contrastive embeddings and the caption NLL of a CoCa model on one batch.

    image (b, 3, H, W), text (b, L) tokens, valid (b,) samples holding both. Returns
    (image_embedding (b, d), text_embedding (b, d), nll_sum (), tokens ()), embeddings
    L2-normalised; the decoder sees text[:, :-1] and predicts text[:, 1:], as in open_clip.
    """
    image_latent, image_tokens = coca._encode_image(image, normalize=True)
    text_latent, token_embs = coca._encode_text(text, normalize=True)
    hidden = decoder_hidden(coca.text_decoder, image_tokens, token_embs[:, :-1])
    nll_sum, tokens = caption_token_nll(
        hidden, coca.text_decoder.text_projection, text[:, 1:], pad_id=coca.pad_id, valid=valid, chunk=chunk
    )
    return image_latent, text_latent, nll_sum, tokens
