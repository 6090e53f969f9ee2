"""Array interop and thread settings next to other libraries."""
import os
import subprocess
import sys
import textwrap

import numpy as np

import fastattn
import fastattn.reference as ref
from util import assert_close


class DLPackOnly:
    """An array-like that offers only the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, *args, **kwargs):
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class ArrayInterfaceOnly:
    def __init__(self, a):
        self.__array_interface__ = a.__array_interface__
        self._keep = a


def test_dlpack_buffer_and_array_interface_inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 9, 8)).astype(np.float32)
    expected = ref.attention(q, q, q)
    for wrap in (DLPackOnly, ArrayInterfaceOnly, memoryview):
        assert_close(fastattn.attention(wrap(q), wrap(q), wrap(q)), expected)
    # zero copy: what fastattn reads is q's memory
    from fastattn import _validate

    assert np.shares_memory(_validate.as_array(DLPackOnly(q), "q"), q)
    assert np.shares_memory(_validate.as_array(ArrayInterfaceOnly(q), "q"), q)
    assert np.shares_memory(_validate.as_array(memoryview(q), "q"), q)


def test_import_does_not_change_other_thread_settings():
    code = textwrap.dedent(
        """
        import json, numpy as np
        from threadpoolctl import threadpool_info
        def state():
            s = {lib["internal_api"] + ":" + lib["filepath"]: lib["num_threads"] for lib in threadpool_info()}
            try:
                import torch
                s["torch"] = torch.get_num_threads()
            except ImportError:
                pass
            return s
        before = state()
        import fastattn
        q = np.random.default_rng(0).standard_normal((2, 4, 300, 32), dtype=np.float32)
        fastattn.attention(q, q, q)
        after = state()
        print(json.dumps([before, {k: v for k, v in after.items() if k in before}]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    before, after = json.loads(res.stdout)
    assert before == after
