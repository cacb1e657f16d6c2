from lkfx.cli import main

raise SystemExit(main())
