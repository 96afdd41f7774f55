"""gcp-storage-emulator, plus the `x-goog-generation` header on downloads.

tensorstore (orbax's array store) reads each object's generation from that header, as GCS
sends it; without it every OCDBT manifest update fails with "Malformed StorageGeneration".

  python -m tests.gcs_emulator start --port P --in-memory --default-bucket B
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = obj['generation']
  except NotFound:
    pass  # the emulator's own handler answers 404
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # before the server module builds its routes

from gcp_storage_emulator.__main__ import main  # noqa: E402

if __name__ == '__main__':
  sys.exit(main())
