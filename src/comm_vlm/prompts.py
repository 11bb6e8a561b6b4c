"""The task prompts shared by training data, the benchmarks and the synthetic demo.

REC and REG ask in Shikra's phrasing (COMM trains and evaluates Shikra-style); short-answer questions end with
LLaVA-1.5's suffix (its VQAv2, GQA and POPE evaluation prompts); the caption prompt is our choice.
"""

SHORT_ANSWER = "Answer the question using a single word or phrase."
REC_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
REG_PROMPT = "Please provide a short description for this region: {box}."
CAPTION_PROMPT = "Describe the image briefly."

__all__ = ["CAPTION_PROMPT", "REC_PROMPT", "REG_PROMPT", "SHORT_ANSWER"]
