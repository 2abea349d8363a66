"""Input data for Sapiens pretraining and fine-tuning: sources (image folders, ArrayRecord, TFDS,
COCO keypoints, dense-label folders), numpy transforms, and the Grain pipelines that turn them into
uint8 batches."""
from sapiens_jax.data.pipeline import make_pretrain_iterator
from sapiens_jax.data.pipeline import make_task_iterator
from sapiens_jax.data.sources import make_source
from sapiens_jax.data.sources import write_array_record
from sapiens_jax.data.transforms import decode_image
from sapiens_jax.data.transforms import denormalize
from sapiens_jax.data.transforms import ImageDecodeError
from sapiens_jax.data.transforms import normalize
