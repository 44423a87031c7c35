set -u
python3 -m pip install -q --no-index --find-links .device/wheels "jsonargparse[signatures]" soundfile constriction safetensors 2>&1 | tail -1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
D=.device/data/text/docs-prose.txt.gz
( time timeout 300 python3 cli.py fit --config configs/bench/quality/text-megabyte-p2.yaml --data.path $D --data.cache_dir /tmp/cache \
   --trainer.max_time 00:00:03:30 --trainer.enable_progress_bar false ) > $OUT/fit.txt 2>&1
grep -E "val/bpb|stopped|real|rror" $OUT/fit.txt | tail -6
C=logs/text-megabyte-p2/version_0/checkpoints/last.ckpt
timeout 60 python3 cli.py test --ckpt_path $C --data.cache_dir /tmp/cache --trainer.enable_progress_bar false 2>&1 | grep -E "test/bpb|rror" | tail -2
timeout 150 python3 benchmarks/compress_speed.py --ckpt_path $C --test_split_of $D --cache_dir /tmp/cache --write_split /tmp/test.bin \
   --batch_size 1040 --out $OUT/compress-4096.json > $OUT/compress-4096.txt 2>&1; tail -12 $OUT/compress-4096.txt
timeout 100 python3 benchmarks/compress_speed.py --ckpt_path $C /tmp/test.bin --chunk_len 1024 --batch_size 4100 --out $OUT/compress-1024.json > $OUT/compress-1024.txt 2>&1; tail -8 $OUT/compress-1024.txt
head -c 1000000 /tmp/test.bin > /tmp/one.bin
( time timeout 60 megabyte compress --ckpt_path $C /tmp/one.bin /tmp/one.mbz --batch_size 256 ) 2>&1 | tail -4
( time timeout 60 megabyte decompress --ckpt_path $C /tmp/one.mbz /tmp/one.out ) 2>&1 | tail -4
cmp /tmp/one.bin /tmp/one.out && echo "separate processes: bit-exact"
