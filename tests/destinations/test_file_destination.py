"""FileDestination on a real filesystem: atomic, private, never overwriting."""

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from twisted.trial import unittest

from interface_engine.destinations import FileDestination, Result
from tests.messages import adt_a01


class FileDestinationTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.addCleanup(self._chmod_back)  # cleanups run last-added first
        self.dest = FileDestination("files")

    def _chmod_back(self):
        for path in [self.dir, *self.dir.rglob("*")]:
            if path.is_dir():
                path.chmod(0o700)

    async def test_writes_the_bytes_privately_creating_directories(self):
        target = self.dir / "out" / "adt" / "MSG1.hl7"
        result = await self.dest.deliver(adt_a01("MSG1"), str(target))
        self.assertEqual(result, Result(ok=True))
        self.assertEqual(target.read_bytes(), adt_a01("MSG1"))
        self.assertEqual(stat.S_IMODE(target.stat().st_mode), 0o600)
        for directory in (self.dir / "out", self.dir / "out" / "adt"):
            self.assertEqual(stat.S_IMODE(directory.stat().st_mode), 0o700)
        self.assertEqual(os.listdir(target.parent), ["MSG1.hl7"])  # no temp file left behind

    async def test_a_name_near_the_length_limit_still_gets_a_temp_file(self):
        target = self.dir / ("N" * 250)
        result = await self.dest.deliver(adt_a01("MSG7"), str(target))
        self.assertTrue(result.ok, result.error)
        self.assertEqual(target.read_bytes(), adt_a01("MSG7"))

    async def test_a_relative_target_is_relative_to_the_working_directory(self):
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        result = await self.dest.deliver(b"MSH|^~\\&|A\r", "rel/one.hl7")
        self.assertTrue(result.ok)
        self.assertEqual((self.dir / "rel" / "one.hl7").read_bytes(), b"MSH|^~\\&|A\r")

    async def test_replaying_identical_bytes_is_ok_and_different_bytes_are_refused(self):
        target = str(self.dir / "MSG2.hl7")
        await self.dest.deliver(adt_a01("MSG2"), target)
        again = await self.dest.deliver(adt_a01("MSG2"), target)
        self.assertEqual(again, Result(ok=True, response=b"already present"))
        other = await self.dest.deliver(adt_a01("MSG2", family="ROE"), target)
        self.assertEqual(other, Result(ok=False, error="MSG2.hl7 exists with different content",
                                       retry=False))
        self.assertEqual(Path(target).read_bytes(), adt_a01("MSG2"))
        self.assertNotIn("ROE", other.error)

    async def test_an_unwritable_directory_is_a_retryable_error(self):
        if os.geteuid() == 0:
            raise unittest.SkipTest("root writes into read-only directories")
        locked = self.dir / "locked"
        locked.mkdir(mode=0o500)
        result = await self.dest.deliver(adt_a01("MSG3"), str(locked / "sub" / "MSG3.hl7"))
        self.assertFalse(result.ok)
        self.assertTrue(result.retry)
        self.assertIn("Permission denied", result.error)
        result = await self.dest.deliver(adt_a01("MSG3"), str(locked / "MSG3.hl7"))
        self.assertEqual((result.ok, result.retry), (False, True))
        self.assertIn("Permission denied", result.error)
        self.assertEqual(os.listdir(locked), [])

    async def test_a_full_disk_is_a_retryable_error_and_leaves_no_temp_file(self):
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "fsync", full)
        result = await self.dest.deliver(adt_a01("MSG6"), str(self.dir / "MSG6.hl7"))
        self.assertEqual(result, Result(ok=False, retry=True,
                                        error=f"No space left on device (writing in {self.dir})"))
        self.assertEqual(os.listdir(self.dir), [])

    async def test_a_directory_in_the_way_is_not_retried(self):
        (self.dir / "MSG4.hl7").mkdir()
        result = await self.dest.deliver(adt_a01("MSG4"), str(self.dir / "MSG4.hl7"))
        self.assertEqual((result.ok, result.retry), (False, False))

    async def test_an_empty_target_is_refused(self):
        for target in (None, "", str(self.dir) + os.sep):
            result = await self.dest.deliver(adt_a01("MSG5"), target)
            self.assertEqual((result.ok, result.retry), (False, False))

    async def test_a_batch_is_written_in_order_and_stops_at_the_first_failure(self):
        items = [(adt_a01(f"B{i}"), str(self.dir / "b" / f"B{i}.hl7")) for i in range(6)]
        (self.dir / "b").mkdir()
        (self.dir / "b" / "B1.hl7").write_bytes(adt_a01("B1"))            # a replay's earlier file
        (self.dir / "b" / "B3.hl7").write_bytes(adt_a01("B3", family="ROE"))  # someone else's
        results = await self.dest.deliver_batch(items)
        self.assertEqual(results, [Result(ok=True), Result(ok=True, response=b"already present"),
                                   Result(ok=True), Result(ok=False, retry=False,
                                                           error="B3.hl7 exists with different content")])
        self.assertEqual(sorted(os.listdir(self.dir / "b")), ["B0.hl7", "B1.hl7", "B2.hl7", "B3.hl7"])
        for i in (0, 2):
            self.assertEqual((self.dir / "b" / f"B{i}.hl7").read_bytes(), adt_a01(f"B{i}"))
        results = await self.dest.deliver_batch(items[4:])
        self.assertEqual(results, [Result(ok=True), Result(ok=True)])

    async def test_a_batch_whose_flush_fails_writes_no_file(self):
        from interface_engine.destinations import file

        if file._syncfs is None:
            raise unittest.SkipTest("no syncfs on this system: batches are synced file by file")

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(file, "_syncfs", full)
        items = [(adt_a01(f"F{i}"), str(self.dir / f"F{i}.hl7")) for i in range(3)]
        results = await self.dest.deliver_batch(items)
        self.assertEqual(results, [Result(ok=False, retry=True,
                                          error=f"No space left on device (writing in {self.dir})")])
        self.assertEqual(os.listdir(self.dir), [])
