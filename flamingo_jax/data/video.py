"""Video decoding with PyAV: ``num_frames`` frames at ``fps`` (Flamingo: 8 frames at 1 FPS).

``decode_clip`` never crashes on bad input: empty, truncated or undecodable data and containers
without a video stream raise :class:`BadRecord` ('empty_video', 'corrupt_video').
"""

from __future__ import annotations

import io

import numpy as np

from flamingo_jax.data.examples import sample_frame_indices
from flamingo_jax.data.images import BadRecord, ImageConfig, preprocess


def _frame_count(stream, container) -> tuple[int, float]:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise BadRecord("corrupt_video", "no frame rate")
    fps = float(rate)
    if stream.frames:
        return int(stream.frames), fps
    if stream.duration is not None and stream.time_base is not None:
        return max(int(round(float(stream.duration * stream.time_base) * fps)), 1), fps
    if container.duration:
        return max(int(round(container.duration / 1e6 * fps)), 1), fps
    raise BadRecord("corrupt_video", "unknown length")


def decode_clip(data: bytes, *, num_frames: int = 8, fps: float = 1.0, rng=None) -> np.ndarray:
    """Encoded video bytes -> uint8[num_frames, H, W, 3]; frames ``1/fps`` s apart from a random
    start (``rng``) or from the beginning (``rng`` None); a short clip repeats its last frame."""
    import av  # PyAV; imported here so image-only pipelines don't need it

    if not data:
        raise BadRecord("empty_video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadRecord("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            total, source_fps = _frame_count(stream, container)
            wanted = sample_frame_indices(total, source_fps, num_frames=num_frames, fps=fps, rng=rng)
            needed = set(int(i) for i in wanted)
            last_needed = int(wanted.max())
            frames: dict[int, np.ndarray] = {}
            latest = None
            for position, frame in enumerate(container.decode(stream)):
                if position in needed:
                    frames[position] = frame.to_ndarray(format="rgb24")
                latest = (position, frame)
                if position >= last_needed:
                    break
            if latest is None:
                raise BadRecord("corrupt_video", "no decodable frame")
            # The container may promise more frames than it holds: use the last decoded one.
            fallback = frames.get(latest[0]) if latest[0] in frames else latest[1].to_ndarray(format="rgb24")
    except BadRecord:
        raise
    except Exception as error:  # PyAV raises many types for bad data (av.error.*, ValueError, ...)
        raise BadRecord("corrupt_video", f"{type(error).__name__}: {error}") from None
    return np.stack([frames.get(int(i), fallback) for i in wanted])


def preprocess_clip(frames: np.ndarray, config: ImageConfig, rng: np.random.Generator | None) -> np.ndarray:
    """uint8[F, H, W, 3] -> float32[F, S, S, 3] with the *same* augmentation on every frame."""
    seed = None if rng is None else int(rng.integers(2**63))
    return np.stack(
        [preprocess(frame, config, None if seed is None else np.random.default_rng(seed)) for frame in frames]
    )
