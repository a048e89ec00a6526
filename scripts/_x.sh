#!/usr/bin/env bash
# throwaway: run 23 call 2 (MLA pre-gather A/B)
set -u
cd "$(dirname "$0")/.."
o=$OUT/x; mkdir -p $o
save() { tar czf "$OUT/x.tgz" -C "$o" . ; cp $o/sum.txt $OUT/ 2>/dev/null; true; }
for s in a:main b:pregather; do
  d=/tmp/${s%%:*}; rm -rf $d; mkdir -p $d && python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" .gpu-packed/${s#*:}.tar.xz $d
done
export MOEKIT_REQUIRE_GPU=1
t=/tmp/b/.gpu/tests
timeout 150 $t/mla > $o/mla.txt 2>&1; echo "mla rc=$? $(grep 'test result' $o/mla.txt|tail -1)" | tee -a $o/sum.txt
MOEKIT_MLA_PREGATHER=0 timeout 150 $t/mla > $o/mla-inkernel.txt 2>&1; echo "mla inkernel rc=$? $(grep 'test result' $o/mla-inkernel.txt|tail -1)" | tee -a $o/sum.txt
timeout 150 $t/graph > $o/graph.txt 2>&1; echo "graph rc=$? $(grep 'test result' $o/graph.txt|tail -1)" | tee -a $o/sum.txt
save
for tool in memcheck racecheck; do
  PROPTEST_CASES=4 timeout 200 compute-sanitizer --tool $tool --error-exitcode 99 $t/mla paged > $o/$tool-mla.txt 2>&1
  echo "$tool mla paged rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' $o/$tool-mla.txt|tail -1)" | tee -a $o/sum.txt
done
save
for s in a b; do
  timeout 200 /tmp/$s/.gpu/examples/moe_layer > $o/demo-$s.txt 2>&1; echo "demo $s rc=$? $(grep -E 'permute|layer|check' $o/demo-$s.txt | tr '\n' ' ')" | tee -a $o/sum.txt
done
save
OUT=$OUT/ab1 TEST_SIDES="" bash scripts/ab-bundles.sh .gpu-packed/main.tar.xz .gpu-packed/pregather.tar.xz /decompress 3
save
