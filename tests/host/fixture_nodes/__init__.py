"""Test-only ComfyUI nodes, linked into a test server's custom_nodes by the host tests that need them (never shipped).

``QVDTestTextEmbedding`` stands in for CLIPLoader (umt5-xxl) + CLIPTextEncode in Wan graphs: Wan's text encoder is
5.7 B parameters (11 GB), which a 24 GiB CI machine cannot hold beside the suite, and ComfyUI builds it at that size
whatever a file holds. It gives a CONDITIONING of the shape umt5 gives ([1, tokens, 4096]), seeded by the text, with
channels of unequal ranges as a real encoder's; the graph after it is the user's.

``QVDTestClipVisionEncode`` stands in for CLIPVisionLoader (clip_vision_h) + CLIPVisionEncode in Wan 2.1 I2V graphs
the same way: ComfyUI builds ViT-H at its full size (632 M parameters) whatever a file holds. It gives the
CLIP_VISION_OUTPUT WanImageToVideo passes on, ``penultimate_hidden_states`` [B, 257, 1280], seeded by the image.
"""
import hashlib

import torch


class QVDTestTextEmbedding:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True}),
                             "tokens": ("INT", {"default": 24, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 16, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text, tokens, width):
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        channel = torch.Generator().manual_seed(0)  # one encoder: its channels' ranges do not depend on the text
        ranges = 0.05 + 0.3 * torch.rand(width, generator=channel) ** 3
        return ([[torch.randn(1, tokens, width, generator=g) * ranges, {}]],)


class QVDTestClipVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, image):
        from comfy.clip_vision import Output

        seed = int.from_bytes(hashlib.sha256(image.float().numpy().tobytes()).digest()[:8], "little")
        out = Output()
        out["penultimate_hidden_states"] = torch.randn(image.shape[0], 257, 1280,
                                                       generator=torch.Generator().manual_seed(seed))
        return (out,)


NODE_CLASS_MAPPINGS = {"QVDTestTextEmbedding": QVDTestTextEmbedding, "QVDTestClipVisionEncode": QVDTestClipVisionEncode}
