from bench.engines import main

raise SystemExit(main())
