"""Input data for Sapiens pretraining: sources of encoded images, numpy
transforms, and the Grain pipeline that turns them into batches."""
from sapiens_jax.data.pipeline import make_pretrain_iterator
from sapiens_jax.data.sources import make_source
from sapiens_jax.data.sources import write_array_record
from sapiens_jax.data.transforms import decode_image
from sapiens_jax.data.transforms import denormalize
from sapiens_jax.data.transforms import ImageDecodeError
from sapiens_jax.data.transforms import normalize
