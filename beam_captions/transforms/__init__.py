"""One PTransform per stage: read, prepare, preview, caption, enhance, write."""

from beam_captions.transforms.caption import CaptionWindows
from beam_captions.transforms.enhance import EnhanceCaptions
from beam_captions.transforms.prepare import PrepareWindows
from beam_captions.transforms.previews import GeneratePreviews
from beam_captions.transforms.read import ReadClips
from beam_captions.transforms.write import WriteOutputs

__all__ = ["ReadClips", "PrepareWindows", "GeneratePreviews", "CaptionWindows", "EnhanceCaptions", "WriteOutputs"]
