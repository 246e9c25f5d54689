"""TFDS data sets read without TensorFlow: the builder lookup and preparation both data kinds share."""

from aigc_jax.errors import UserError


def tfds_builder(name: str):
  """`tfds.builder(name)`, or one sentence when TFDS has no such data set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.builder(name)
  except Exception as e:  # TFDS raises several types for unknown names.
    raise UserError(f"TFDS has no data set {name!r} ({type(e).__name__}); check the name in the TFDS catalog.") from None


def prepare(builder, name: str, alternatives: str) -> None:
  """Downloads and prepares `builder` as array_record (readable by `as_data_source`) unless it already is.

  `alternatives` names the offline data sources to suggest when that fails, e.g. "text_file:PATH".
  """
  try:
    builder.download_and_prepare(file_format="array_record")
  except ModuleNotFoundError as e:
    raise UserError(f"Preparing TFDS data set {name!r} needs the Python package {e.name!r}: install the "
                    f"'tfds-prepare' extra (`pip install -e '.[tfds-prepare]'` in a clone), or use "
                    f"data.source={alternatives}.") from None
  except Exception as e:  # Network and download failures come in many types.
    raise UserError(f"Could not download TFDS data set {name!r} ({type(e).__name__}: {str(e)[:120]}); "
                    f"check the network or use data.source={alternatives}.") from None
