"""``--arch transformer_frozen_encoder``: train a decoder on a fixed encoder (``bild-jobs distill
--share-encoder``).

A small model that shares the big model's encoder must learn on exactly the encoder outputs it
will be given when decoding: the big encoder's, without dropout. So the encoder's weights take no
gradient (fairseq's optimizer skips parameters that do not require one) and the encoder stays in
eval mode while the model trains. The weights and config are a stock ``transformer``'s: the
exported student loads in stock fairseq (``export_for_inference`` names the stock architecture).
"""
from __future__ import annotations

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel, base_architecture

ARCH = "transformer_frozen_encoder"


@register_model(ARCH)
class FrozenEncoderTransformer(TransformerModel):
    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> "FrozenEncoderTransformer":
        super().train(mode)
        self.encoder.eval()  # no dropout: the outputs the decoder will see at inference
        return self


@register_model_architecture(ARCH, ARCH)
def frozen_encoder_architecture(args) -> None:
    base_architecture(args)
